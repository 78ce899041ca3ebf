//! Shared evaluation: the toplevels of a request's hosts evaluated in as few nix processes as the
//! batch size and memory limit allow, before each host is built.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use tracing::{info, warn};

use super::{Checkout, Jobs};
use crate::nix::NixError;

impl Jobs {
    /// Evaluates the toplevels of `hosts` in as few nix processes as `eval_batch_size` and
    /// `eval_memory_limit_mb` allow. A batch that fails (an error `tryEval` cannot catch) or goes
    /// over the memory limit is split in halves and retried; a host left without a drv is
    /// evaluated alone when its turn comes, which also yields its own error message.
    pub(super) async fn evaluate_together(
        &self,
        checkout: &Checkout<'_>,
        hosts: &[String],
    ) -> HashMap<String, String> {
        let mut drvs = self.evaluate_shared(checkout, hosts).await;
        let paths: Vec<&str> = drvs.values().map(String::as_str).collect();
        let gone = checkout.roots.add(&self.nix, &paths, "shared").await;
        // A cached drv collected since: its host evaluates again when its turn comes.
        drvs.retain(|_, drv| !gone.contains(drv));
        drvs
    }

    /// [`Self::evaluate_together`] before the drvs are rooted.
    async fn evaluate_shared(
        &self,
        checkout: &Checkout<'_>,
        hosts: &[String],
    ) -> HashMap<String, String> {
        let Checkout {
            flake,
            repo,
            rev,
            id: request_id,
            ..
        } = *checkout;
        let mut drvs: HashMap<String, String> = hosts
            .iter()
            .filter_map(|host| Some((host.clone(), self.evaluated.drv(repo.as_str(), rev, host)?)))
            .collect();
        let hosts: Vec<String> = hosts
            .iter()
            .filter(|h| !drvs.contains_key(*h))
            .cloned()
            .collect();
        let hosts = hosts.as_slice();
        if hosts.len() < 2 {
            return drvs;
        }
        let started = Instant::now();
        let mut batches: VecDeque<Vec<String>> = hosts
            .chunks(self.evaluation.batch_size.max(1))
            .map(<[String]>::to_vec)
            .collect();
        let (mut processes, mut peak) = (0u32, 0u64);
        while let Some(batch) = batches.pop_front() {
            processes += 1;
            let hosts_in_batch = batch.len();
            match self.nix.eval_toplevel_drvs(flake, &batch).await {
                Ok((evaluated, rss)) => {
                    peak = peak.max(rss);
                    drvs.extend(
                        evaluated
                            .into_iter()
                            .filter_map(|(host, drv)| Some((host, drv?))),
                    );
                }
                Err(err @ NixError::MemoryLimit { .. }) => {
                    // Halving would evaluate the shared part again at every level; the hosts
                    // left evaluate one at a time instead, which costs no more than a plain
                    // per-host loop plus this one stopped attempt.
                    let left = hosts_in_batch + batches.iter().map(Vec::len).sum::<usize>();
                    warn!(request_id = %request_id, hosts = left, error = %err, "shared evaluation ran out of memory; evaluating the hosts one at a time");
                    batches.clear();
                }
                Err(err) if batch.len() > 1 => {
                    warn!(request_id = %request_id, hosts = batch.len(), error = %err, "shared evaluation failed; splitting the batch");
                    let (first, second) = batch.split_at(batch.len() / 2);
                    batches.push_front(second.to_vec());
                    batches.push_front(first.to_vec());
                }
                Err(err) => {
                    warn!(request_id = %request_id, host = batch[0].as_str(), error = %err, "host left to evaluate alone");
                }
            }
        }
        info!(
            request_id = %request_id,
            hosts = hosts.len(),
            evaluated = drvs.len(),
            nix_processes = processes,
            peak_evaluator_rss_mb = peak / (1024 * 1024),
            duration_ms = started.elapsed().as_millis() as u64,
            "shared evaluation done"
        );
        drvs
    }
}
