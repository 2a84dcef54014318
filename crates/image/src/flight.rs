//! Single flight: concurrent callers with the same key share one execution.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

type Flights<T> = Arc<Mutex<HashMap<String, Shared<BoxFuture<'static, T>>>>>;

/// Runs at most one future per key at a time; callers arriving while it runs
/// get a clone of its output.
///
/// The future is shared, so it keeps making progress as long as any caller
/// still polls it, and it removes its own entry when it completes (a caller
/// that arrives afterwards starts a fresh flight, which then finds the result
/// on disk).
pub(crate) struct SingleFlight<T: Clone> {
    flights: Flights<T>,
}

impl<T: Clone> std::fmt::Debug for SingleFlight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFlight").finish_non_exhaustive()
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    pub(crate) fn new() -> Self {
        SingleFlight { flights: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// Joins the flight for `key`, starting it with `start` if none is running.
    pub(crate) async fn run<F>(&self, key: &str, start: impl FnOnce() -> F) -> T
    where
        F: Future<Output = T> + Send + 'static,
    {
        let shared = {
            let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
            match flights.get(key) {
                Some(existing) => existing.clone(),
                None => {
                    let work = start();
                    let registry = Arc::clone(&self.flights);
                    let owned_key = key.to_owned();
                    let flight = async move {
                        let output = work.await;
                        registry.lock().unwrap_or_else(PoisonError::into_inner).remove(&owned_key);
                        output
                    }
                    .boxed()
                    .shared();
                    flights.insert(key.to_owned(), flight.clone());
                    flight
                }
            }
        };
        shared.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_execution() {
        let flight = SingleFlight::<usize>::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, wait) = tokio::sync::watch::channel(false);
        let call = || {
            let runs = Arc::clone(&runs);
            let mut wait = wait.clone();
            flight.run("k", move || async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = wait.wait_for(|go| *go).await;
                n
            })
        };
        let (a, b, c, _) = tokio::join!(call(), call(), call(), async {
            tokio::task::yield_now().await;
            let _ = release.send(true);
        });
        assert_eq!((a, b, c), (1, 1, 1));
        // Later callers start a new flight.
        assert_eq!(call().await, 2);
    }
}
