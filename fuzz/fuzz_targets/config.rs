//! The `--config-file` path: `VmConfig::from_json` on arbitrary text. Any panic is a bug.
//!
//! Checked beyond "no panic": a config that parses and validates survives a round trip:
//! serialised with serde_json (as `GET /vm/config` does) it parses and validates again, to
//! an equal `VmConfig`.

#![no_main]

use ember::config::VmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A config file is read with `read_to_string`, which refuses invalid UTF-8 before
    // `from_json` sees it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = VmConfig::from_json(text) else {
        return;
    };
    for json in [
        serde_json::to_string(&config).expect("a parsed config serialises"),
        serde_json::to_string_pretty(&config).expect("a parsed config serialises"),
    ] {
        match VmConfig::from_json(&json) {
            Ok(again) => assert_eq!(again, config, "round trip changed the config: {json}"),
            Err(e) => panic!("a serialised config does not parse again: {e}\n{json}"),
        }
    }
});
