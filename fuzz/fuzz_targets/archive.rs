//! The streaming torch.save archive checker and the `data.pkl` reader on arbitrary bytes.
//!
//! The first byte chooses the size of the pieces the rest is fed in (so the fuzzer explores piece
//! boundaries); the rest is the archive, and also goes to `tensor::read` as a `data.pkl`.
#![no_main]

use bytes::Bytes;
use dcpfetch::item::{archive::ArchiveChecker, tensor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // 0: the whole input in one piece; otherwise 1 + selector^2 bytes (1 ..= 65026).
    let piece = if selector == 0 {
        rest.len().max(1)
    } else {
        1 + (selector as usize) * (selector as usize)
    };
    let all = Bytes::copy_from_slice(rest);
    let mut checker = ArchiveChecker::new();
    let mut at = 0;
    while at < all.len() {
        let end = (at + piece).min(all.len());
        checker.feed(all.slice(at..end));
        at = end;
    }
    assert_eq!(checker.len(), rest.len() as u64);
    let _ = checker.finish();
    let _ = tensor::read(rest);
});
