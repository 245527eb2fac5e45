//! A selection spec of arbitrary JSON, resolved against the committed `fixtures/model` checkpoint:
//! never panics, never hangs, and what it selects names real entries and chunks, in order.
#![no_main]

use std::sync::LazyLock;

use dcpfetch::metadata::Checkpoint;
use dcpfetch::selection::Spec;
use libfuzzer_sys::fuzz_target;

static CHECKPOINT: LazyLock<Checkpoint> = LazyLock::new(|| {
    let data = include_bytes!("../../fixtures/model/.metadata");
    Checkpoint::from_files(&[(".metadata".into(), data.to_vec())])
        .expect("fixtures/model/.metadata reads")
});

fuzz_target!(|data: &[u8]| {
    let ck = &*CHECKPOINT;
    let Ok(spec) = serde_json::from_slice::<Spec>(data) else {
        return;
    };
    let Ok((selected, _warnings)) = spec.resolve(ck) else {
        return;
    };
    // Documented on `Selected`: entries in checkpoint order, chunk indexes ascending, all real.
    for pair in selected.windows(2) {
        assert!(pair[0].entry < pair[1].entry, "entries out of order");
    }
    for s in &selected {
        let entry = &ck.entries[s.entry];
        for pair in s.chunks.windows(2) {
            assert!(pair[0] < pair[1], "chunks of {} out of order", entry.fqn);
        }
        if let Some(&last) = s.chunks.last() {
            assert!(last < entry.chunks.len(), "chunk index past the end");
        }
    }
});
