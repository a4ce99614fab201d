//! The metadata service's guest-facing network stack: `mmds::fuzzing::fuzz_frames` feeds a
//! fresh stack arbitrary guest frames (optionally with repaired IPv4/TCP checksums, so
//! inputs get past the checksum checks into TCP and HTTP) with a clock moved between them,
//! and drains every reply. Any panic is a bug.
//!
//! Checked beyond "no panic" (in `fuzz_frames`): every reply parses as Ethernet, IPv4 and
//! TCP; replies to one frame end; the connection table stays within its bound.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember::mmds::fuzzing::fuzz_frames(data);
});
