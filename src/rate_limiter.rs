//! Token-bucket I/O rate limiting for virtio devices, with Firecracker's semantics so that
//! clients written against its API see the same throughput.
//!
//! A [`RateLimiter`] holds up to two independent buckets (bytes and operations) and a
//! one-shot timerfd. A device asks [`RateLimiter::consume`] before each request; when that
//! says no, the timer is armed for the moment enough tokens will have been refilled, the
//! device stops processing its queue, and it resumes when the vmm event loop reports the
//! timer fd readable and the device calls [`RateLimiter::event_handler`].
//!
//! Every time-dependent function has an `_at(now)` twin taking the current instant, so the
//! unit tests drive a synthetic clock and check the arithmetic exactly.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use crate::config::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

/// Shortest timer we arm. A zero it_value would disarm a timerfd, and waking up for a few
/// microseconds' worth of tokens burns host CPU without changing the long-run rate: refill
/// is computed from elapsed time, so a later wake-up simply finds more tokens waiting.
const MIN_TIMER_DELAY: Duration = Duration::from_millis(1);

const NANOS_PER_MILLI: u128 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// The timer fd was reported readable but held no expiration (e.g. the timer was
    /// re-armed by `update_buckets` after it fired). Harmless: log and carry on.
    #[error("rate limiter timer event without an expiration")]
    SpuriousEvent,
    #[error("cannot read the rate limiter timer: {0}")]
    Timer(#[source] io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Bytes,
    Ops,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BucketReduction {
    /// The tokens were taken.
    Success,
    /// Not enough tokens; nothing was taken.
    Failure,
    /// A request larger than the bucket was let through from a full bucket; the excess is
    /// now debt, `excess / size` times the bucket size, repaid by refill before the budget
    /// grows again.
    OverConsumption(f64),
}

/// `size` tokens refilled linearly over `refill_time_ms`, plus a one-time burst that is
/// spent before the refilled budget and never refilled. The bucket starts full.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    refill_time_ms: u64,
    one_time_burst: u64,
    budget: u64,
    /// Tokens owed after an over-consumption; refill pays this off before `budget` grows.
    /// Invariant: `debt > 0` implies `budget == 0`.
    debt: u64,
    /// Refill is accounted up to this instant...
    last_update: Instant,
    /// ...plus this fraction of a token, in token-nanoseconds (always `< refill_ns`).
    carry: u128,
}

impl TokenBucket {
    /// `None` when `size` or `refill_time_ms` is 0: that bucket does not limit anything.
    pub fn new(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<Self> {
        Self::new_at(size, one_time_burst, refill_time_ms, Instant::now())
    }

    fn new_at(size: u64, one_time_burst: u64, refill_time_ms: u64, now: Instant) -> Option<Self> {
        if size == 0 || refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size,
            refill_time_ms,
            one_time_burst,
            budget: size,
            debt: 0,
            last_update: now,
            carry: 0,
        })
    }

    fn from_config(cfg: &TokenBucketConfig, now: Instant) -> Option<Self> {
        Self::new_at(
            cfg.size,
            cfg.one_time_burst.unwrap_or(0),
            cfg.refill_time,
            now,
        )
    }

    pub fn reduce(&mut self, tokens: u64) -> BucketReduction {
        self.reduce_at(tokens, Instant::now())
    }

    /// Takes `tokens`, or nothing at all. The burst is spent first; what it cannot cover
    /// comes from the budget. A remainder larger than `size` can never fit, so (as in
    /// Firecracker) it is let through once the budget is full and the excess becomes debt —
    /// unlike Firecracker, which forgets the excess once its timer fires and so lets
    /// oversized requests run at up to twice the configured rate.
    fn reduce_at(&mut self, tokens: u64, now: Instant) -> BucketReduction {
        if tokens <= self.one_time_burst {
            self.one_time_burst -= tokens;
            return BucketReduction::Success;
        }
        let rest = tokens - self.one_time_burst;
        self.replenish_at(now);
        if rest <= self.budget {
            self.budget -= rest;
        } else if rest > self.size && self.budget == self.size {
            self.budget = 0;
            self.debt = rest - self.size;
        } else {
            return BucketReduction::Failure;
        }
        self.one_time_burst = 0;
        if self.debt > 0 {
            return BucketReduction::OverConsumption(self.debt as f64 / self.size as f64);
        }
        BucketReduction::Success
    }

    /// Gives back tokens a caller took but did not use (the other bucket refused the
    /// request). They pay off debt, then refill the budget up to `size`, and whatever is
    /// left returns to the one-time burst. That conserves the total; when a request drew
    /// on both burst and budget the split can shift towards the budget, which only ever
    /// makes the limiter slightly stricter. Return only tokens that were taken.
    pub fn force_replenish(&mut self, tokens: u64) {
        let to_debt = tokens.min(self.debt);
        self.debt -= to_debt;
        let rest = tokens - to_debt;
        let to_budget = rest.min(self.size - self.budget);
        self.budget += to_budget;
        self.one_time_burst = self.one_time_burst.saturating_add(rest - to_budget);
    }

    /// Refill credit since `last_update`, in token-nanoseconds: `elapsed * size` plus the
    /// fraction of a token left over last time. One token costs `refill_ns` of credit.
    fn credit_at(&self, now: Instant) -> u128 {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        // Capping at ~584 years keeps the product inside u128.
        let elapsed = elapsed.min(u128::from(u64::MAX));
        (elapsed * u128::from(self.size)).saturating_add(self.carry)
    }

    /// Credits the tokens refilled since `last_update`: `elapsed * size / refill_time`.
    /// Only whole tokens are credited; the remainder is kept exactly in `carry`, so frequent
    /// calls lose nothing to rounding.
    fn replenish_at(&mut self, now: Instant) {
        let credit = self.credit_at(now);
        let refill_ns = self.refill_ns();
        let tokens = u64::try_from(credit / refill_ns).unwrap_or(u64::MAX);
        self.carry = credit % refill_ns;
        self.last_update = now;
        let to_debt = tokens.min(self.debt);
        self.debt -= to_debt;
        self.budget = self.budget.saturating_add(tokens - to_debt);
        if self.budget >= self.size {
            // A full bucket does not accrue: refill beyond this point is simply lost.
            self.budget = self.size;
            self.carry = 0;
        }
    }

    /// Time from `now` until the budget holds `target` tokens with no debt, assuming
    /// `replenish_at(now)` just ran. `target` must be at most `size`.
    fn time_until_at(&self, target: u64, now: Instant) -> Duration {
        if self.debt == 0 && self.budget >= target {
            return Duration::ZERO;
        }
        let deficit =
            (u128::from(self.debt) + u128::from(target)).saturating_sub(u128::from(self.budget));
        let missing = deficit
            .saturating_mul(self.refill_ns())
            .saturating_sub(self.credit_at(now));
        // Round up: arriving a nanosecond early would find the bucket one token short.
        let nanos = missing.div_ceil(u128::from(self.size));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// How long a refused request of `tokens` has to wait, per `reduce_at`'s rules.
    fn wait_for_at(&self, tokens: u64, now: Instant) -> Duration {
        let rest = tokens.saturating_sub(self.one_time_burst);
        self.time_until_at(rest.min(self.size), now)
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.refill_time_ms) * NANOS_PER_MILLI
    }

    /// Tokens available from the refilled budget (the burst is separate).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn capacity(&self) -> u64 {
        self.size
    }

    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    pub fn debt(&self) -> u64 {
        self.debt
    }

    pub fn refill_time_ms(&self) -> u64 {
        self.refill_time_ms
    }
}

/// Bytes and operations limits for one device queue, plus the timer that wakes the device
/// when a throttled request can go ahead.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    timer_armed: bool,
    /// The delay last armed, for debugging and for the simulated-clock tests.
    timer_delay: Duration,
}

impl RateLimiter {
    /// Absent buckets, and buckets with `size` or `refill_time` 0, do not limit.
    pub fn new(config: &RateLimiterConfig) -> io::Result<Self> {
        let now = Instant::now();
        // SAFETY: timerfd_create takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created timerfd that nothing else owns. Non-blocking so a
        // spurious event_handler call cannot stall the event loop. CLOCK_MONOTONIC is the
        // clock `Instant` reads on Linux, so computed delays and the timer agree.
        let timer = unsafe { TimerFd::from_raw_fd(fd) };
        Ok(RateLimiter {
            bandwidth: config
                .bandwidth
                .as_ref()
                .and_then(|c| TokenBucket::from_config(c, now)),
            ops: config
                .ops
                .as_ref()
                .and_then(|c| TokenBucket::from_config(c, now)),
            timer,
            timer_armed: false,
            timer_delay: Duration::ZERO,
        })
    }

    pub fn unlimited() -> io::Result<Self> {
        Self::new(&RateLimiterConfig::default())
    }

    /// `true`: the request may proceed. `false`: throttled; the timer is armed and the
    /// device should stop taking requests until `event_handler` has run.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        // Without a bucket of this kind there is nothing to count: skip the clock, which
        // is a measurable share of a small request's cost.
        if !self.timer_armed && self.bucket_mut(kind).is_none() {
            return true;
        }
        self.consume_at(tokens, kind, Instant::now())
    }

    fn consume_at(&mut self, tokens: u64, kind: TokenType, now: Instant) -> bool {
        // While blocked nothing passes, of either kind: the device retries its queue in
        // order, so a small request must not overtake the one that is waiting.
        if self.timer_armed {
            return false;
        }
        let Some(bucket) = self.bucket_mut(kind) else {
            return true;
        };
        match bucket.reduce_at(tokens, now) {
            BucketReduction::Success => true,
            BucketReduction::Failure => {
                let delay = bucket.wait_for_at(tokens, now);
                // Without a timer the queue would stall until the guest kicks it again, so
                // if arming fails let the request through: a brief overshoot beats a hang.
                !self.arm_timer(delay)
            }
            BucketReduction::OverConsumption(_) => {
                // Block until the debt is repaid (Firecracker's ratio * refill_time).
                let delay = bucket.time_until_at(0, now);
                self.arm_timer(delay);
                true
            }
        }
    }

    /// Gives back `tokens` of `kind` taken for a request that did not go ahead.
    pub fn manual_replenish(&mut self, tokens: u64, kind: TokenType) {
        if let Some(bucket) = self.bucket_mut(kind) {
            bucket.force_replenish(tokens);
        }
    }

    pub fn is_blocked(&self) -> bool {
        self.timer_armed
    }

    /// Call when the timer fd is readable: clears it and unblocks the limiter.
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        match self.timer.wait() {
            Ok(_) => {
                self.timer_armed = false;
                Ok(())
            }
            Err(e) if e.errno() == libc::EAGAIN => Err(RateLimiterError::SpuriousEvent),
            Err(e) => Err(RateLimiterError::Timer(e.into())),
        }
    }

    /// `PATCH` semantics, as in Firecracker: an absent bucket is left as it is (state and
    /// all); a given bucket replaces the old one with a fresh, full bucket (burst included);
    /// a given bucket with `size` or `refill_time` 0 removes that limit.
    pub fn update_buckets(&mut self, config: &RateLimiterConfig) {
        let now = Instant::now();
        if let Some(cfg) = &config.bandwidth {
            self.bandwidth = TokenBucket::from_config(cfg, now);
        }
        if let Some(cfg) = &config.ops {
            self.ops = TokenBucket::from_config(cfg, now);
        }
        // A device waiting on the old limits should re-check the new ones promptly. The
        // timer must still fire (it is what restarts the queue), so re-arm it, not clear it.
        if self.timer_armed {
            match self.timer.reset(MIN_TIMER_DELAY, None) {
                Ok(()) => self.timer_delay = MIN_TIMER_DELAY,
                Err(e) => log::warn!("rate limiter: cannot re-arm the timer after an update: {e}"),
            }
        }
    }

    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    fn bucket_mut(&mut self, kind: TokenType) -> Option<&mut TokenBucket> {
        match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// One-shot; returns whether the limiter is now blocked.
    fn arm_timer(&mut self, delay: Duration) -> bool {
        let delay = delay.max(MIN_TIMER_DELAY);
        match self.timer.reset(delay, None) {
            Ok(()) => {
                self.timer_armed = true;
                self.timer_delay = delay;
            }
            Err(e) => log::error!("rate limiter: cannot arm the timer, not throttling: {e}"),
        }
        self.timer_armed
    }
}

/// A bucket's tokens as a snapshot keeps them; its size and refill time come from the
/// configuration the device is attached with again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketState {
    pub budget: u64,
    pub one_time_burst: u64,
    pub debt: u64,
}

/// What a rate limiter holds beyond its configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimiterState {
    pub bandwidth: Option<BucketState>,
    pub ops: Option<BucketState>,
    /// A request was waiting for tokens.
    pub blocked: bool,
}

impl TokenBucket {
    fn save_state(&self) -> BucketState {
        BucketState {
            budget: self.budget,
            one_time_burst: self.one_time_burst,
            debt: self.debt,
        }
    }

    /// Takes the saved tokens back, never more than the bucket holds; refill goes on from
    /// `now` (the time the VM spent saved does not count).
    fn restore_state(&mut self, saved: &BucketState, now: Instant) {
        self.debt = saved.debt;
        self.budget = if saved.debt > 0 {
            0
        } else {
            saved.budget.min(self.size)
        };
        self.one_time_burst = saved.one_time_burst;
        self.last_update = now;
        self.carry = 0;
    }
}

impl RateLimiter {
    /// The buckets' tokens, for a snapshot.
    pub fn save_state(&self) -> RateLimiterState {
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::save_state),
            ops: self.ops.as_ref().map(TokenBucket::save_state),
            blocked: self.timer_armed,
        }
    }

    /// Puts saved tokens into the buckets the configuration made (a bucket the
    /// configuration no longer has stays absent). A limiter that was blocking wakes its
    /// device at once, which then waits again for exactly what it still lacks.
    pub fn restore_state(&mut self, saved: &RateLimiterState) {
        let now = Instant::now();
        for (bucket, state) in [
            (&mut self.bandwidth, &saved.bandwidth),
            (&mut self.ops, &saved.ops),
        ] {
            if let (Some(b), Some(s)) = (bucket.as_mut(), state) {
                b.restore_state(s, now);
            }
        }
        if saved.blocked {
            self.arm_timer(MIN_TIMER_DELAY);
        }
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_tokens_come_back_into_a_limiter_of_the_same_configuration() {
        let config: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth":{"size":1000,"one_time_burst":500,"refill_time":100000},
                "ops":{"size":10,"refill_time":100000}}"#,
        )
        .unwrap();
        let mut rl = RateLimiter::new(&config).unwrap();
        assert!(rl.consume(700, TokenType::Bytes));
        assert!(rl.consume(4, TokenType::Ops));
        let saved = rl.save_state();
        let b = saved.bandwidth.unwrap();
        assert_eq!(
            (b.one_time_burst, b.budget),
            (0, 800),
            "the burst is spent first"
        );
        assert_eq!(saved.ops.unwrap().budget, 6);
        let json = serde_json::to_string(&saved).unwrap();
        let mut fresh = RateLimiter::new(&config).unwrap();
        fresh.restore_state(&serde_json::from_str(&json).unwrap());
        // The refill time is 100 s: what is left is what was saved, not a full bucket.
        let b = fresh.bandwidth().unwrap();
        assert_eq!((b.budget(), b.one_time_burst()), (800, 0));
        assert!(!fresh.consume(900, TokenType::Bytes), "only 800 tokens");
        assert!(fresh.is_blocked());
        // A blocked limiter restores blocked, and its timer wakes the device soon.
        let blocked = fresh.save_state();
        assert!(blocked.blocked);
        let mut again = RateLimiter::new(&config).unwrap();
        again.restore_state(&blocked);
        assert!(again.is_blocked());
        std::thread::sleep(Duration::from_millis(5));
        again.event_handler().unwrap();
        assert!(!again.is_blocked());
        // Saved tokens never exceed a smaller bucket the new configuration gives.
        let small: RateLimiterConfig =
            serde_json::from_str(r#"{"bandwidth":{"size":100,"refill_time":100000}}"#).unwrap();
        let mut smaller = RateLimiter::new(&small).unwrap();
        smaller.restore_state(&saved);
        assert_eq!(smaller.bandwidth().unwrap().budget(), 100);
        assert!(smaller.ops().is_none());
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn bucket(size: u64, burst: u64, refill_ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new_at(size, burst, refill_ms, now).expect("non-zero bucket")
    }

    fn tb(size: u64, one_time_burst: Option<u64>, refill_time: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst,
            refill_time,
        })
    }

    fn limiter(
        bandwidth: Option<TokenBucketConfig>,
        ops: Option<TokenBucketConfig>,
    ) -> RateLimiter {
        RateLimiter::new(&RateLimiterConfig { bandwidth, ops }).expect("timerfd")
    }

    /// Remaining time on the kernel timer.
    fn timer_remaining(rl: &RateLimiter) -> Duration {
        let mut spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        // SAFETY: the fd is a live timerfd and `spec` is a valid, writable itimerspec.
        let ret = unsafe { libc::timerfd_gettime(rl.as_raw_fd(), &mut spec) };
        assert_eq!(ret, 0);
        Duration::new(spec.it_value.tv_sec as u64, spec.it_value.tv_nsec as u32)
    }

    #[test]
    fn zero_size_or_refill_is_unlimited() {
        let now = Instant::now();
        assert!(TokenBucket::new_at(0, 10, 100, now).is_none());
        assert!(TokenBucket::new_at(10, 10, 0, now).is_none());
    }

    #[test]
    fn burst_spent_first_then_refill_rate() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 500, 1000, t0);
        assert_eq!(b.reduce_at(400, t0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (100, 1000));
        // 100 from the burst, 900 from the budget.
        assert_eq!(b.reduce_at(1000, t0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
        assert_eq!(b.reduce_at(100, t0), BucketReduction::Success);
        assert_eq!(b.reduce_at(1, t0), BucketReduction::Failure);
        // 1000 tokens per second: 1 per ms, and the burst never comes back.
        assert_eq!(b.reduce_at(1, t0 + ms(1)), BucketReduction::Success);
        assert_eq!(b.reduce_at(300, t0 + ms(300)), BucketReduction::Failure);
        assert_eq!(b.reduce_at(300, t0 + ms(301)), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 0));
    }

    #[test]
    fn refill_proportional_to_time_and_capped() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 1000, t0);
        assert_eq!(b.reduce_at(100, t0), BucketReduction::Success);
        b.replenish_at(t0 + ms(250));
        assert_eq!(b.budget(), 25);
        b.replenish_at(t0 + Duration::from_secs(3600));
        assert_eq!(b.budget(), 100);
        // Fractions carry over: 3 tokens per 10 ms is one per 3.33 ms.
        let mut b = bucket(3, 0, 10, t0);
        assert_eq!(b.reduce_at(3, t0), BucketReduction::Success);
        let budgets: Vec<u64> = [3, 4, 6, 7, 9, 10]
            .iter()
            .map(|&m| {
                b.replenish_at(t0 + ms(m));
                b.budget()
            })
            .collect();
        assert_eq!(budgets, [0, 1, 1, 2, 2, 3]);
    }

    #[test]
    fn refused_request_consumes_nothing() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 100, t0);
        assert_eq!(b.reduce_at(100, t0), BucketReduction::Success);
        // 50 refilled, 60 wanted: refused, and the 50 stay for the retry.
        assert_eq!(b.reduce_at(60, t0 + ms(50)), BucketReduction::Failure);
        assert_eq!(b.budget(), 50);
        assert_eq!(b.reduce_at(60, t0 + ms(60)), BucketReduction::Success);
        assert_eq!(b.budget(), 0);

        // Ops granted, bytes refused: the device gives the op back.
        let mut rl = limiter(tb(1000, None, 1000), tb(10, None, 1000));
        assert!(rl.consume_at(1000, TokenType::Bytes, t0));
        assert!(rl.consume_at(1, TokenType::Ops, t0));
        assert!(!rl.consume_at(10, TokenType::Bytes, t0));
        rl.manual_replenish(1, TokenType::Ops);
        assert_eq!(rl.ops().map(TokenBucket::budget), Some(10));
        assert_eq!(rl.bandwidth().map(TokenBucket::budget), Some(0));
    }

    #[test]
    fn force_replenish_pays_debt_then_budget_then_burst() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 1000, t0);
        assert_eq!(b.reduce_at(250, t0), BucketReduction::OverConsumption(1.5));
        b.force_replenish(250);
        assert_eq!((b.debt(), b.budget(), b.one_time_burst()), (0, 100, 0));
        let mut b = bucket(100, 30, 1000, t0);
        assert_eq!(b.reduce_at(20, t0), BucketReduction::Success);
        b.force_replenish(20);
        assert_eq!((b.budget(), b.one_time_burst()), (100, 30));
    }

    #[test]
    fn ops_and_bytes_buckets_are_independent() {
        let t0 = Instant::now();
        let mut rl = limiter(tb(4096, None, 100), tb(2, None, 100));
        assert!(rl.consume_at(4096, TokenType::Bytes, t0));
        assert!(rl.consume_at(2, TokenType::Ops, t0));
        assert_eq!(rl.ops().map(TokenBucket::budget), Some(0));
        assert_eq!(rl.bandwidth().map(TokenBucket::budget), Some(0));
        // Only ops limited: bytes are free.
        let mut rl = limiter(None, tb(1, None, 100));
        assert!(rl.consume_at(u64::MAX, TokenType::Bytes, t0));
        assert!(rl.consume_at(1, TokenType::Ops, t0));
        assert!(!rl.consume_at(1, TokenType::Ops, t0));
        // Blocked means blocked for both kinds, so requests stay in order.
        assert!(!rl.consume_at(1, TokenType::Bytes, t0));
    }

    #[test]
    fn over_consumption_needs_full_bucket_and_creates_debt() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 1000, t0);
        assert_eq!(b.reduce_at(1, t0), BucketReduction::Success);
        assert_eq!(b.reduce_at(250, t0), BucketReduction::Failure);
        assert_eq!(b.wait_for_at(250, t0), ms(10));
        assert_eq!(
            b.reduce_at(250, t0 + ms(10)),
            BucketReduction::OverConsumption(1.5)
        );
        assert_eq!((b.budget(), b.debt()), (0, 150));
        assert_eq!(b.time_until_at(0, t0 + ms(10)), ms(1500));
        b.replenish_at(t0 + ms(1010));
        assert_eq!((b.budget(), b.debt()), (0, 50));
        b.replenish_at(t0 + ms(2010));
        assert_eq!((b.budget(), b.debt()), (50, 0));
    }

    #[test]
    fn throughput_converges_to_size_over_refill_time() {
        // A device loop on a simulated clock: when throttled, jump to the timer deadline.
        // 100 KiB per 100 ms = 1 024 000 B/s, for both small and oversized requests.
        for request in [4096u64, 300 * 1024] {
            let t0 = Instant::now();
            let mut rl = limiter(tb(100 * 1024, None, 100), None);
            let (mut now, mut sent) = (t0, 0u64);
            while now < t0 + Duration::from_secs(10) {
                if rl.consume_at(request, TokenType::Bytes, now) {
                    sent += request;
                }
                if rl.is_blocked() {
                    now += rl.timer_delay;
                    rl.timer_armed = false;
                }
            }
            // 10 s of refill plus the initial full bucket, within one request.
            let expected = 10 * 1_024_000 + 100 * 1024;
            assert!(sent.abs_diff(expected) <= request, "{request}: sent {sent}");
        }
    }

    #[test]
    fn throttled_consume_arms_timer_for_the_missing_tokens() {
        let t0 = Instant::now();
        let mut rl = limiter(tb(1000, None, 1000), None);
        assert!(rl.consume_at(900, TokenType::Bytes, t0));
        assert!(!rl.is_blocked());
        // 100 left, 600 wanted: 500 tokens at 1 per ms.
        assert!(!rl.consume_at(600, TokenType::Bytes, t0));
        assert!(rl.is_blocked());
        assert_eq!(rl.timer_delay, ms(500));
        let left = timer_remaining(&rl);
        assert!(left <= ms(500) && left > ms(400), "{left:?}");
        assert!(!rl.consume_at(1, TokenType::Bytes, t0 + ms(600)));

        // Over-consumption lets the request through but blocks for the debt.
        let mut rl = limiter(tb(100, None, 1000), None);
        assert!(rl.consume_at(300, TokenType::Bytes, t0));
        assert!(rl.is_blocked());
        assert_eq!(rl.timer_delay, ms(2000));
        let left = timer_remaining(&rl);
        assert!(left <= ms(2000) && left > ms(1900), "{left:?}");
    }

    #[test]
    fn event_handler_unblocks_after_real_timer() {
        let mut rl = limiter(tb(1000, None, 200), None);
        assert!(matches!(
            rl.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(!rl.consume(50, TokenType::Bytes)); // 10 ms away
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, length 1.
        let ready = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert_eq!(ready, 1);
        rl.event_handler().expect("timer expired");
        assert!(!rl.is_blocked());
        assert!(rl.consume(50, TokenType::Bytes));
    }

    #[test]
    fn unlimited_never_blocks() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::unlimited().expect("timerfd");
        let mut zero = limiter(tb(0, Some(5), 100), tb(10, None, 0));
        for _ in 0..1000 {
            assert!(rl.consume_at(u64::MAX, TokenType::Bytes, t0));
            assert!(rl.consume_at(u64::MAX, TokenType::Ops, t0));
            assert!(zero.consume_at(u64::MAX, TokenType::Bytes, t0));
            assert!(zero.consume_at(u64::MAX, TokenType::Ops, t0));
        }
        assert!(!rl.is_blocked() && !zero.is_blocked());
    }

    #[test]
    fn update_buckets_replaces_given_keeps_absent_disables_zero() {
        let t0 = Instant::now();
        let mut rl = limiter(tb(100, None, 1000), tb(10, None, 1000));
        assert!(rl.consume_at(100, TokenType::Bytes, t0));
        assert!(rl.consume_at(4, TokenType::Ops, t0));
        assert!(!rl.consume_at(1, TokenType::Bytes, t0));
        assert!(timer_remaining(&rl) > ms(5));

        // Bandwidth replaced by a fresh, full bucket; ops absent, so untouched.
        rl.update_buckets(&RateLimiterConfig {
            bandwidth: tb(500, Some(7), 100),
            ops: None,
        });
        let bw = rl.bandwidth().expect("bandwidth bucket");
        assert_eq!(
            (bw.capacity(), bw.budget(), bw.one_time_burst()),
            (500, 500, 7)
        );
        assert_eq!(rl.ops().map(TokenBucket::budget), Some(6));
        // Still blocked, but the timer now fires promptly so the device re-checks.
        assert!(rl.is_blocked());
        assert!(timer_remaining(&rl) <= MIN_TIMER_DELAY);

        rl.update_buckets(&RateLimiterConfig {
            bandwidth: None,
            ops: tb(0, None, 0),
        });
        assert!(rl.ops().is_none());
        assert!(rl.bandwidth().is_some());
    }
}
