//! A `.metadata` file of arbitrary bytes: the fast reader, the unpickler, DCP model and linking
//! never panic, never hang and stay in bounded memory, and whatever the fast reader reads is what
//! the general unpickler and model read.
#![no_main]

use dcpfetch::metadata::{Checkpoint, check_against_general};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check_against_general(data);
    let _ = Checkpoint::from_files(&[(".metadata".into(), data.to_vec())]);
});
