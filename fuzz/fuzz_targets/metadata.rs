//! A `.metadata` file of arbitrary bytes: unpickler, DCP model and linking never panic, never hang
//! and stay in bounded memory.
#![no_main]

use dcpfetch::metadata::Checkpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Checkpoint::from_files(&[(".metadata".into(), data.to_vec())]);
});
