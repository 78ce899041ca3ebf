//! The build slots shared between tenants: weighted fair sharing by stride scheduling.
//!
//! Each tenant has a *pass* that grows by `STRIDE / priority` whenever it starts a request.
//! While several tenants have requests waiting, only the one(s) with the lowest pass pull, so
//! a tenant of priority 3 starts three requests for every one of a tenant of priority 1, and a
//! tenant's backlog never keeps another waiting for more than a few starts. A tenant that comes
//! back from idle goes next, but earns no credit for its idle time.
//!
//! The pull loops say whether their last pull found a request ([`Shares::wanting`]); that is
//! how the builder knows who waits without holding anyone's requests. With one account (no
//! tenants) every pull is allowed at once.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

/// Pass added for one start at priority 1.
const STRIDE: u64 = 1_000_000;
/// Longest a pull loop waits for its turn before it pulls anyway (a loop of another tenant that
/// is stuck, e.g. failing to reach NATS, must not stop this tenant's builds).
const TURN_WAIT: Duration = Duration::from_secs(5);

/// The turn-keeping of every account a builder serves, by index.
pub struct Shares {
    state: Mutex<Vec<Share>>,
    changed: Notify,
}

struct Share {
    stride: u64,
    pass: u64,
    /// Pull loops of this tenant whose last pull found a request.
    wanting: HashSet<usize>,
}

impl Shares {
    /// One share per account, with its priority (1 and up).
    pub fn new(priorities: &[u32]) -> Self {
        Self {
            state: Mutex::new(
                priorities
                    .iter()
                    .map(|priority| Share {
                        stride: STRIDE / u64::from((*priority).max(1)),
                        pass: 0,
                        wanting: HashSet::new(),
                    })
                    .collect(),
            ),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Share>> {
        // Only short critical sections that cannot panic touch the state.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records whether pull loop `puller` of account `account` found a request on its last pull.
    pub fn wanting(&self, account: usize, puller: usize, found: bool) {
        let mut shares = self.lock();
        let floor = shares
            .iter()
            .enumerate()
            .filter(|(index, share)| *index != account && !share.wanting.is_empty())
            .map(|(_, share)| share.pass)
            .min();
        let Some(share) = shares.get_mut(account) else {
            return;
        };
        let was_idle = share.wanting.is_empty();
        if found {
            share.wanting.insert(puller);
            if was_idle {
                // Just ahead of the tenants already waiting: next in line, with no more credit.
                share.pass = share.pass.max(floor.unwrap_or(0).saturating_sub(1));
            }
        } else {
            share.wanting.remove(&puller);
        }
        drop(shares);
        self.changed.notify_waiters();
    }

    /// Account `account` started a request.
    pub fn took(&self, account: usize) {
        if let Some(share) = self.lock().get_mut(account) {
            share.pass += share.stride;
        }
        self.changed.notify_waiters();
    }

    /// `Some(others_waiting)` when `account` may pull now: no other account with requests
    /// waiting is behind it (ties go to the lower index). `others_waiting` says whether another
    /// account has requests waiting, so the pull should not wait for one of its own.
    fn may_pull(&self, account: usize) -> Option<bool> {
        let shares = self.lock();
        let mine = shares.get(account)?.pass;
        let mut others_waiting = false;
        for (index, share) in shares.iter().enumerate() {
            if index == account || share.wanting.is_empty() {
                continue;
            }
            others_waiting = true;
            if share.pass < mine || (share.pass == mine && index < account) {
                return None;
            }
        }
        Some(others_waiting)
    }

    /// Waits until `account` may pull (at most a few seconds); whether other accounts have
    /// requests waiting.
    pub async fn turn(&self, account: usize) -> bool {
        let deadline = tokio::time::Instant::now() + TURN_WAIT;
        loop {
            let changed = self.changed.notified();
            if let Some(others_waiting) = self.may_pull(account) {
                return others_waiting;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which account pulls next, given that every account has requests waiting.
    fn next(shares: &Shares, accounts: usize) -> usize {
        (0..accounts)
            .find(|account| shares.may_pull(*account).is_some())
            .expect("someone may pull")
    }

    #[test]
    fn priorities_share_the_starts_and_nobody_starves() {
        let shares = Shares::new(&[3, 1]);
        shares.wanting(0, 0, true);
        shares.wanting(1, 1, true);
        let mut starts = [0, 0];
        let mut order = Vec::new();
        for _ in 0..8 {
            let account = next(&shares, 2);
            starts[account] += 1;
            order.push(account);
            shares.took(account);
        }
        assert_eq!(starts, [6, 2], "{order:?}");
        // The priority-1 tenant waits at most three starts of the other.
        assert!(order.windows(4).all(|w| w.contains(&1)), "{order:?}");
    }

    #[test]
    fn an_idle_tenant_earns_no_credit_and_does_not_hold_up_others() {
        let shares = Shares::new(&[1, 1]);
        shares.wanting(0, 0, true);
        for _ in 0..10 {
            assert_eq!(shares.may_pull(0), Some(false));
            shares.took(0);
        }
        // Tenant 1 arrives: it does not get ten starts in a row.
        shares.wanting(1, 1, true);
        let order: Vec<usize> = (0..4)
            .map(|_| {
                let account = next(&shares, 2);
                shares.took(account);
                account
            })
            .collect();
        assert_eq!(order.iter().filter(|a| **a == 1).count(), 2, "{order:?}");
        // Once tenant 1's queue is empty, tenant 0 pulls at once again.
        shares.wanting(1, 1, false);
        assert_eq!(shares.may_pull(0), Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_waits_for_the_tenant_behind_and_not_forever() {
        let shares = std::sync::Arc::new(Shares::new(&[1, 1]));
        shares.wanting(0, 0, true);
        shares.wanting(1, 1, true);
        shares.took(0);
        let waiting = tokio::spawn({
            let shares = shares.clone();
            async move { shares.turn(0).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        shares.took(1);
        assert!(waiting.await.expect("turn"));
        // A tenant that never pulls again holds the other up for TURN_WAIT at most.
        shares.took(0);
        let began = tokio::time::Instant::now();
        assert!(shares.turn(0).await);
        assert_eq!(began.elapsed(), TURN_WAIT);
    }
}
