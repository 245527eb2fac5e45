//! The non-executing unpickler on arbitrary bytes: it never panics, never hangs and stays in
//! bounded memory. Whatever it reads, `Pickle::write` either refuses it or writes a pickle that
//! reads again and writes back to the same bytes (the invariant of the unit test
//! `written_pickles_read_back_the_same` in src/metadata/pickle.rs).
#![no_main]

use dcpfetch::metadata::pickle::Pickle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Pickle::parse(data) else {
        return;
    };
    let Ok(written) = p.write() else {
        return;
    };
    let again = match Pickle::parse(&written) {
        Ok(again) => again,
        Err(e) => panic!("a pickle written by Pickle::write does not parse: {e}"),
    };
    match again.write() {
        Ok(rewritten) => assert!(
            rewritten == written,
            "writing a written pickle's graph gives other bytes"
        ),
        Err(e) => panic!("a written pickle's graph cannot be written again: {e}"),
    }
});
