//! Sizes and versions of many objects at once: a bounded number of stats in flight, or one
//! listing when there are many, or the first page of a listing started early.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};

use super::{ObjectMeta, ObjectName, Source, SourceError};

/// Objects of a listing, with their size and version.
pub type Listing = Vec<(String, ObjectMeta)>;

/// A named object could not be looked up.
#[derive(Debug, thiserror::Error)]
#[error("cannot find the shard file {name}")]
pub struct StatError {
    pub name: ObjectName,
    #[source]
    pub source: SourceError,
}

/// The first page of a listing, started before it is needed (beside the metadata's read) on a
/// store where it saves the stats their round trip ([`super::ObjectStore::list_first_page`]);
/// taken once, by the first [`stat_each`] given it. Empty (the default) elsewhere.
#[derive(Debug, Clone, Default)]
pub struct Ahead(Arc<Mutex<Option<Started>>>);

/// The listing's task, stopped if no one takes it.
#[derive(Debug)]
struct Started(JoinHandle<Option<Result<(Listing, bool), SourceError>>>);

impl Drop for Started {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Ahead {
    /// Starts the first page of `source`'s listing, where the store lists ahead.
    pub fn start(source: &Source) -> Ahead {
        let store = source.0.clone();
        let task = tokio::spawn(async move {
            let page = store.list_first_page()?;
            Some(page.await)
        });
        Ahead(Arc::new(Mutex::new(Some(Started(task)))))
    }

    /// The page and whether it is the whole listing, or why there is none, once; `None` if it
    /// was not asked for (not started, not a store that lists ahead, or already taken) or is
    /// still not there [`PATIENCE`] after it is needed (then it is stopped).
    async fn take(&self) -> Option<Result<(Listing, bool), SourceError>> {
        let mut started = self
            .0
            .lock()
            .expect("no panics while holding the lock")
            .take()?;
        tokio::time::timeout(PATIENCE, &mut started.0)
            .await
            .ok()?
            .ok()?
    }
}

/// How long the stats wait for a listing ahead that has not answered by the time they need it,
/// before asking for each file themselves: a listing page takes a round trip, like the HEADs it
/// saves, so one that takes far longer (a store that lists slowly, a stalled connection) must
/// not hold the command up.
const PATIENCE: Duration = Duration::from_secs(1);

/// Size and version of each named object, each with its own result, in no particular order.
///
/// What the listing `ahead` names needs no request. The rest: up to `in_flight` objects are asked
/// for concurrently (HEADs or stats); more than that are looked up in one listing of the
/// checkpoint (on S3 a request per 1,000 objects instead of one per object: checkpoints saved
/// with a file per item have thousands), unless the listing ahead was already the whole of it;
/// what the listings lack (a name in a sub-folder, a missing object), or everything when listing
/// is not allowed, is then asked for one by one.
pub async fn stat_each(
    source: &Source,
    names: &[ObjectName],
    in_flight: usize,
    ahead: &Ahead,
) -> Vec<(ObjectName, Result<ObjectMeta, SourceError>)> {
    let in_flight = in_flight.max(1);
    let mut out = Vec::with_capacity(names.len());
    let mut rest = names.to_vec();
    let mut found = |listed: Listing, rest: &mut Vec<ObjectName>| {
        let mut listed: HashMap<String, ObjectMeta> = listed.into_iter().collect();
        rest.retain(|name| match listed.remove(name.as_str()) {
            Some(meta) => {
                out.push((name.clone(), Ok(meta)));
                false
            }
            None => true,
        });
    };
    // No second listing after a whole one, or after one that was not allowed.
    let mut list_again = true;
    match ahead.take().await {
        Some(Ok((listed, whole))) => {
            found(listed, &mut rest);
            list_again = !whole;
        }
        Some(Err(SourceError::AccessDenied { .. })) => list_again = false,
        Some(Err(_)) | None => {}
    }
    if list_again
        && rest.len() > in_flight
        && let Ok(listed) = source.0.list().await
    {
        found(listed, &mut rest);
    }
    let mut tasks = JoinSet::new();
    let mut pending = rest.into_iter();
    loop {
        while tasks.len() < in_flight {
            let Some(name) = pending.next() else { break };
            let store = source.0.clone();
            tasks.spawn(async move {
                let meta = store.stat(&name).await;
                (name, meta)
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        out.push(done.expect("stat tasks do not panic"));
    }
    out
}

/// Size and version of every named object; the first that cannot be found (in the order
/// [`stat_each`] answers) is the error.
pub async fn stat_all(
    source: &Source,
    names: &[ObjectName],
    in_flight: usize,
    ahead: &Ahead,
) -> Result<HashMap<ObjectName, ObjectMeta>, StatError> {
    let mut out = HashMap::with_capacity(names.len());
    for (name, meta) in stat_each(source, names, in_flight, ahead).await {
        match meta {
            Ok(meta) => {
                out.insert(name, meta);
            }
            Err(source) => return Err(StatError { name, source }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::source::fault::{Fault, Method, Rule};
    use crate::source::{FaultStore, LocalSource, TransferStats};

    /// A folder with `n` files `f0`..: file `fi` holds `i` bytes.
    fn folder(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..n {
            std::fs::write(dir.path().join(format!("f{i}")), vec![7u8; i]).unwrap();
        }
        dir
    }

    fn faulty(dir: &tempfile::TempDir) -> (Arc<FaultStore>, Source) {
        let local = LocalSource::new(dir.path().to_owned(), Arc::new(TransferStats::default()));
        let store = Arc::new(FaultStore::new(Arc::new(local)));
        (store.clone(), Source::new(store))
    }

    fn names(n: usize) -> Vec<ObjectName> {
        (0..n)
            .map(|i| ObjectName::new(&format!("f{i}")).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn few_names_are_stat_one_by_one() {
        let dir = folder(5);
        let (store, source) = faulty(&dir);
        let got = stat_all(&source, &names(5), 8, &Ahead::default())
            .await
            .unwrap();
        for (i, name) in names(5).iter().enumerate() {
            assert_eq!(got[name].size, i as u64);
        }
        let calls = store.calls();
        assert_eq!(calls.len(), 5);
        assert!(calls.iter().all(|c| c.method == Method::Stat));
    }

    #[tokio::test]
    async fn many_names_are_listed_once_and_the_rest_stat() {
        let dir = folder(6);
        let (store, source) = faulty(&dir);
        let mut asked = names(6);
        asked.push(ObjectName::new("missing").unwrap());
        let each = stat_each(&source, &asked, 2, &Ahead::default()).await;
        assert_eq!(each.len(), 7);
        for (name, meta) in &each {
            match name.as_str() {
                "missing" => assert!(matches!(meta, Err(SourceError::NotFound { .. }))),
                n => assert_eq!(meta.as_ref().unwrap().size, n[1..].parse::<u64>().unwrap()),
            }
        }
        // One listing, and one stat for the name it lacked.
        let calls = store.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].method, Method::List);
        assert_eq!(calls[1].method, Method::Stat);
        assert_eq!(calls[1].name.as_deref(), Some("missing"));
    }

    #[tokio::test]
    async fn a_listing_refused_falls_back_to_stats() {
        let dir = folder(4);
        let (store, source) = faulty(&dir);
        store.add(
            Rule::new(Fault::fail(|_| SourceError::AccessDenied {
                location: "test".into(),
                name: "list".into(),
                detail: "injected".into(),
                hint: None,
            }))
            .on(Method::List),
        );
        let got = stat_all(&source, &names(4), 1, &Ahead::default())
            .await
            .unwrap();
        assert_eq!(got.len(), 4);
        let stats = store
            .calls()
            .iter()
            .filter(|c| c.method == Method::Stat)
            .count();
        assert_eq!(stats, 4);
    }

    #[tokio::test]
    async fn a_missing_object_is_named_and_keeps_its_cause() {
        let dir = folder(3);
        let (_store, source) = faulty(&dir);
        let mut asked = names(3);
        asked.push(ObjectName::new("__9_9.distcp").unwrap());
        let e = stat_all(&source, &asked, 32, &Ahead::default())
            .await
            .unwrap_err();
        assert_eq!(e.name.as_str(), "__9_9.distcp");
        assert_eq!(e.to_string(), "cannot find the shard file __9_9.distcp");
        let cause = std::error::Error::source(&e).unwrap();
        assert!(matches!(
            cause.downcast_ref::<SourceError>(),
            Some(SourceError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn no_more_than_in_flight_stats_run_at_once() {
        let dir = folder(6);
        let (store, source) = faulty(&dir);
        // Every stat waits, so that they overlap if allowed to.
        store.add(
            Rule::new(Fault::Delay(std::time::Duration::from_millis(30)))
                .on(Method::Stat)
                .always(),
        );
        store.add(
            Rule::new(Fault::fail(|_| SourceError::Config("no listing".into()))).on(Method::List),
        );
        stat_all(&source, &names(6), 2, &Ahead::default())
            .await
            .unwrap();
        assert_eq!(store.max_concurrent(Method::Stat), 2);
    }
}
