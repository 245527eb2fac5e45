//! Size and version of many objects at once: HEADs (or stats) in parallel, or one listing.

use std::collections::HashMap;

use tokio::task::JoinSet;

use super::{ObjectMeta, ObjectName, Source, SourceError};

/// Size and version of each named object, each with its own result. Up to `in_flight` objects are asked
/// for concurrently (HEADs or stats). More than that are looked up in one listing of the
/// checkpoint (on S3 a request per 1,000 objects instead of one per object: checkpoints saved with
/// a file per item have thousands); what the listing lacks (a name in a sub-folder, a missing
/// object), or everything when listing is not allowed, is then asked for one by one.
pub async fn stat_each(
    source: &Source,
    names: &[ObjectName],
    in_flight: usize,
) -> Vec<(ObjectName, Result<ObjectMeta, SourceError>)> {
    let mut out = Vec::with_capacity(names.len());
    let mut rest = names.to_vec();
    if names.len() > in_flight.max(1)
        && let Ok(listed) = source.list().await
    {
        let mut listed: HashMap<String, ObjectMeta> = listed.into_iter().collect();
        rest.retain(|name| match listed.remove(name.as_str()) {
            Some(meta) => {
                out.push((name.clone(), Ok(meta)));
                false
            }
            None => true,
        });
    }
    let mut tasks = JoinSet::new();
    let mut pending = rest.into_iter();
    loop {
        while tasks.len() < in_flight.max(1) {
            let Some(name) = pending.next() else { break };
            let source = source.clone();
            tasks.spawn(async move {
                let meta = source.stat(name.as_str()).await;
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
