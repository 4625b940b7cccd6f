//! Reconnect delays: exponential, capped, with jitter so clients do not reconnect in step.

use std::time::Duration;

pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay: a random point in the upper half of the current step, then doubles.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        let mut random = [0u8; 4];
        let _ = getrandom::fill(&mut random);
        let fraction = f64::from(u32::from_le_bytes(random)) / f64::from(u32::MAX);
        step.mul_f64(0.5 + fraction / 2.0)
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[5] >= Duration::from_millis(400) && delays[5] <= Duration::from_millis(800));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
