//! Counts and prints check results, one `PROBE <check> ok|FAIL <detail>` line each.

use crate::line::{Detail, Line};
use crate::serial;

pub struct Report {
    pass: u64,
    fail: u64,
    /// One buffer for every check's detail, so no check needs its own 4 KiB of stack.
    detail: Detail,
}

impl Report {
    pub fn new() -> Self {
        Report {
            pass: 0,
            fail: 0,
            detail: Detail::new(),
        }
    }

    /// Runs one check: `f` writes its detail into the line it is given and returns whether
    /// the check passed.
    pub fn check(&mut self, name: &[u8], f: impl FnOnce(&mut Detail) -> bool) {
        self.detail.clear();
        let ok = f(&mut self.detail);
        if ok {
            self.pass += 1;
        } else {
            self.fail += 1;
        }
        serial::write(b"PROBE ");
        serial::write(name);
        serial::write(if ok { b" ok" } else { b" FAIL" });
        if !self.detail.is_empty() {
            serial::write(b" ");
            serial::write(self.detail.as_bytes());
        }
        serial::write(b"\n");
    }

    pub fn done(&self) {
        let mut line = Line::<48>::new();
        line.str(b"PROBE DONE pass=")
            .dec(self.pass)
            .str(b" fail=")
            .dec(self.fail)
            .str(b"\n");
        serial::write(line.as_bytes());
    }
}
