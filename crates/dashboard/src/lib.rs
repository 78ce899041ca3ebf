//! `homelab-deploy dashboard`: a read-only web page of the fleet, the queue, the running builds
//! (with a progress bar per host), recent results, charts, and each build's log following live.
//!
//! The server renders every part as HTML (the page works with JavaScript off); a small script
//! swaps in the same sections as they change, pushed by server-sent events. Everything it shows
//! comes from NATS through `homelab_deploy_client`, so a read-only NATS user is enough.

mod feed;
pub mod model;
mod render;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use homelab_deploy_protocol::RequestId;
use maud::Markup;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{info, warn};

pub use model::Limits;

use feed::Shared;
use model::Model;

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the dashboard's HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// The overview's sections as last rendered: `(element id, HTML)`.
type Snapshot = Arc<Vec<(&'static str, String)>>;

#[derive(Clone)]
struct App {
    js: async_nats::jetstream::Context,
    shared: Shared,
    snapshot: watch::Receiver<Snapshot>,
    clients: Arc<Semaphore>,
    limits: Limits,
    stop: watch::Receiver<bool>,
}

/// Least time between two renders of the overview: a burst of events (the replay at start) costs
/// a few renders, not one per event.
const RENDER_GAP: Duration = Duration::from_millis(250);
/// The page shows ages (heartbeat, waiting time): rendered again at least this often.
const RENDER_EVERY: Duration = Duration::from_secs(1);

/// Serves the dashboard on `listen` until `shutdown` completes, reading NATS through `client`.
///
/// # Errors
/// [`DashboardError::Bind`] when `listen` cannot be bound; [`DashboardError::Serve`] when the
/// server stops on an I/O error.
pub async fn serve(
    client: async_nats::Client,
    listen: SocketAddr,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DashboardError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| DashboardError::Bind {
            addr: listen,
            source,
        })?;
    let local = listener.local_addr().map_err(DashboardError::Serve)?;
    let js = async_nats::jetstream::new(client);
    let shared = Shared {
        model: Arc::new(Mutex::new(Model::new(limits.clone()))),
        changed: Arc::new(Notify::new()),
    };
    let (snapshot_tx, snapshot) = watch::channel(Snapshot::default());
    let (stop_tx, stop) = watch::channel(false);
    let tasks = [
        tokio::spawn(feed::follow_events(js.clone(), shared.clone())),
        tokio::spawn(feed::poll(js.clone(), shared.clone())),
        tokio::spawn(render_loop(shared.clone(), snapshot_tx)),
    ];
    let app = App {
        js,
        shared,
        snapshot,
        clients: Arc::new(Semaphore::new(limits.sse_clients)),
        limits,
        stop,
    };
    let router = Router::new()
        .route("/", get(overview))
        .route("/events", get(overview_events))
        .route("/builds/{id}", get(build_page))
        .route("/builds/{id}/events", get(build_events))
        .route("/assets/dashboard.css", get(css))
        .route("/assets/dashboard.js", get(js_asset))
        .with_state(app);
    info!(url = %format!("http://{local}/"), "dashboard listening");
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Ends the live streams, which would otherwise hold the graceful shutdown open.
            let _ = stop_tx.send(true);
        })
        .await
        .map_err(DashboardError::Serve);
    for task in tasks {
        task.abort();
    }
    result
}

async fn render_loop(shared: Shared, snapshot: watch::Sender<Snapshot>) {
    loop {
        let _ = tokio::time::timeout(RENDER_EVERY, shared.changed.notified()).await;
        let now = OffsetDateTime::now_utc();
        let sections = shared.with(|model| render::sections(model, now));
        snapshot.send_if_modified(|old| {
            if **old == sections {
                return false;
            }
            *old = Arc::new(sections);
            true
        });
        tokio::time::sleep(RENDER_GAP).await;
    }
}

/// An HTML page with headers that keep it read-only and script-safe: no inline script runs,
/// nothing loads from elsewhere.
fn page(markup: Markup) -> Response {
    let mut response = markup.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", render::CSS)
}

async fn js_asset() -> Response {
    asset("text/javascript; charset=utf-8", render::JS)
}

async fn overview(State(app): State<App>) -> Response {
    let mut sections = app.snapshot.borrow().clone();
    if sections.is_empty() {
        // Before the first render: render now rather than show an empty page.
        let now = OffsetDateTime::now_utc();
        sections = Arc::new(app.shared.with(|model| render::sections(model, now)));
    }
    page(render::overview(&sections))
}

fn too_many_clients(limits: &Limits) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "busy: {} live pages are open, the most this dashboard serves at once; close one or try again later\n",
            limits.sse_clients
        ),
    )
        .into_response()
}

fn section_event(id: &str, html: &str) -> SseEvent {
    SseEvent::default()
        .event("section")
        .data(serde_json::json!({ "id": id, "html": html }).to_string())
}

/// Resolves when the server is stopping.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn overview_events(State(app): State<App>) -> Response {
    let Ok(permit) = app.clients.clone().try_acquire_owned() else {
        return too_many_clients(&app.limits);
    };
    let mut snapshot = app.snapshot.clone();
    snapshot.mark_changed();
    // Per client: the sections it was sent last, to send only what changed since.
    let state = (snapshot, Vec::<String>::new(), permit);
    let updates = futures::stream::unfold(state, |(mut snapshot, mut sent, permit)| async move {
        snapshot.changed().await.ok()?;
        let sections = snapshot.borrow_and_update().clone();
        let mut events = Vec::new();
        for (i, (id, html)) in sections.iter().enumerate() {
            if sent.get(i) != Some(html) {
                events.push(Ok::<_, Infallible>(section_event(id, html)));
            }
        }
        sent = sections.iter().map(|(_, html)| html.clone()).collect();
        Some((futures::stream::iter(events), (snapshot, sent, permit)))
    })
    .flatten()
    .take_until(stopped(app.stop.clone()));
    Sse::new(updates)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The request id of a path, or a `400` that says why it is not one: a malformed id never
/// reaches NATS.
fn parse_id(id: &str) -> Result<RequestId, Box<Response>> {
    RequestId::parse(id).map_err(|err| {
        Box::new(
            (
                StatusCode::BAD_REQUEST,
                format!("invalid: {err}; open a build from the overview, or use the request id `homelab-deploy build` printed\n"),
            )
                .into_response(),
        )
    })
}

async fn build_page(State(app): State<App>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    let now = OffsetDateTime::now_utc();
    let build = app
        .shared
        .with(|model| render::build_section(model.build(id.as_str()), id.as_str(), now));
    let (log, cut, after) = match feed::stored_log(
        &app.js,
        &id,
        app.limits.log_lines,
        app.limits.log_line_chars,
    )
    .await
    {
        Ok(log) => log,
        Err(err) => {
            warn!(id = %id, error = %err, "cannot read a build's log");
            (Vec::new(), false, 0)
        }
    };
    page(render::build_page(id.as_str(), &build, &log, cut, after))
}

#[derive(serde::Deserialize)]
struct After {
    /// Stream sequence of the last log batch the page shows.
    #[serde(default)]
    after: u64,
}

async fn build_events(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(after): Query<After>,
    headers: HeaderMap,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    let Ok(permit) = app.clients.clone().try_acquire_owned() else {
        return too_many_clients(&app.limits);
    };
    // A reconnecting EventSource sends the id of the last log event it got.
    let resumed = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(0);
    let after = after.after.max(resumed);
    let log = match feed::follow_log(&app.js, &id, after).await {
        Ok(log) => log.boxed(),
        Err(err) => {
            warn!(id = %id, error = %err, "cannot follow a build's log");
            futures::stream::pending().boxed()
        }
    };
    let max_chars = app.limits.log_line_chars;
    let log = log.map(move |(seq, batch)| {
        let lines = feed::log_lines(&batch, max_chars);
        Ok::<_, Infallible>(
            SseEvent::default()
                .event("log")
                .id(seq.to_string())
                .data(serde_json::json!({ "lines": lines }).to_string()),
        )
    });
    let mut snapshot = app.snapshot.clone();
    snapshot.mark_changed();
    let shared = app.shared.clone();
    let summary = futures::stream::unfold(
        (snapshot, String::new(), id.clone()),
        move |(mut snapshot, sent, id)| {
            let shared = shared.clone();
            async move {
                loop {
                    snapshot.changed().await.ok()?;
                    snapshot.borrow_and_update();
                    let now = OffsetDateTime::now_utc();
                    let html = shared.with(|model| {
                        render::build_section(model.build(id.as_str()), id.as_str(), now)
                    });
                    if html != sent {
                        let event = Ok::<_, Infallible>(section_event("build", &html));
                        return Some((event, (snapshot, html, id)));
                    }
                }
            }
        },
    );
    let updates = futures::stream::select(summary, log)
        .take_until(stopped(app.stop.clone()))
        .map(move |event| {
            let _held = &permit;
            event
        });
    Sse::new(updates)
        .keep_alive(KeepAlive::default())
        .into_response()
}
