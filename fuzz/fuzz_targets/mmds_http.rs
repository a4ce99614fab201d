//! The metadata service's HTTP layer: `mmds::fuzzing::fuzz_http` answers the bytes of one
//! guest connection request after request. Any panic is a bug; every complete request
//! must use at least one byte and no more than the connection held.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember::mmds::fuzzing::fuzz_http(data);
});
