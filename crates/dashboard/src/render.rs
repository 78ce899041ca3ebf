//! Server-side HTML: the whole page for a first load (and for browsers without JavaScript), and
//! the same sections one by one for the live updates. Charts are inline SVG.

use homelab_deploy_protocol::api::{BuilderState, RequestPhase, BUILDER_LOST_AFTER_SECS};
use homelab_deploy_protocol::HostStatus;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use time::OffsetDateTime;

use crate::feed::LogLine;
use crate::model::{BuildView, FleetEntry, HostView, Model, QUEUE_WINDOW};

/// The page's style sheet and script, served from the binary.
pub const CSS: &str = include_str!("../assets/dashboard.css");
pub const JS: &str = include_str!("../assets/dashboard.js");

/// The sections of the overview page, by element id, in page order.
pub fn sections(model: &Model, now: OffsetDateTime) -> Vec<(&'static str, String)> {
    vec![
        ("status", status(model, now).into_string()),
        ("fleet", fleet(model, now).into_string()),
        ("queue", queue(model, now).into_string()),
        ("running", running(model, now).into_string()),
        ("recent", recent(model).into_string()),
        ("charts", charts(model, now).into_string()),
    ]
}

fn layout(title: &str, events: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                link rel="stylesheet" href="/assets/dashboard.css";
                script src="/assets/dashboard.js" defer {}
            }
            body data-events=(events) {
                header {
                    h1 { a href="/" { "homelab-deploy" } }
                    span #live .live { "static" }
                    noscript { span .hint { "live updates need JavaScript; reload to refresh" } }
                }
                main { (body) }
            }
        }
    }
}

/// The overview page with `sections` (from [`sections`]).
pub fn overview(sections: &[(&'static str, String)]) -> Markup {
    layout(
        "homelab-deploy dashboard",
        "/events",
        html! { @for (_, section) in sections { (PreEscaped(section)) } },
    )
}

fn status(model: &Model, now: OffsetDateTime) -> Markup {
    html! {
        div #status {
            @if let Some(error) = &model.nats_error {
                p .error { "NATS: " (error) }
            }
            @match model.polled_at {
                Some(at) => p .muted { "fleet and queue read " (age(now - at)) " ago" },
                None => p .muted { "reading the fleet and the queue…" },
            }
        }
    }
}

fn age(duration: time::Duration) -> String {
    let secs = duration.whole_seconds().max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

fn seconds(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 600_000 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

fn fleet(model: &Model, now: OffsetDateTime) -> Markup {
    let fleet = model.fleet();
    html! {
        section #fleet {
            h2 { "Fleet" }
            @if fleet.is_empty() {
                p .muted { "no builder has announced itself" }
            } @else {
                table {
                    thead { tr { th { "builder" } th { "state" } th { "current build" } th { "heartbeat" } th { "memory" } th { "repos" } th { "version" } } }
                    tbody { @for entry in &fleet { (builder_row(entry, now)) } }
                }
            }
        }
    }
}

fn builder_row(entry: &FleetEntry, now: OffsetDateTime) -> Markup {
    let info = &entry.info;
    let heartbeat = now - info.heartbeat;
    let (state, class) = match entry.gone_at {
        Some(_) => ("gone".to_owned(), "gone"),
        None if heartbeat.whole_seconds() > BUILDER_LOST_AFTER_SECS => ("lost".to_owned(), "lost"),
        None if info.states.is_empty() => ("idle".to_owned(), "idle"),
        None => {
            let labels: Vec<&str> = info.states.iter().map(|s| s.label()).collect();
            let class = if labels.contains(&"building") {
                "building"
            } else {
                "idle"
            };
            (labels.join(", "), class)
        }
    };
    html! {
        tr .builder data-name=(info.name) {
            td { (info.name) }
            td { span class={"badge " (class)} { (state) }
                @if let Some(at) = entry.gone_at { " " span .muted { "left the registry " (age(now - at)) " ago" } }
                @if let Some(error) = &info.vault_error { br; span .error { "Vault: " (error) } } }
            td { @for state in &info.states {
                @if let BuilderState::Building { repo, target, id } = state {
                    a href={"/builds/" (id)} { (repo) " " (target) } " "
                }
            } }
            td { @if entry.gone_at.is_none() { (age(heartbeat)) " ago" } @else { "—" } }
            td .memory title="memory envelope: the largest expected peak this builder takes" {
                @match info.memory_mb { Some(mb) => { (mb) " MiB" } None => { "—" } } }
            td { (info.repos.join(", ")) }
            td { (info.version) }
        }
    }
}

fn queue(model: &Model, now: OffsetDateTime) -> Markup {
    html! {
        section #queue {
            h2 { "Queue " span .count { (model.queue_total) " waiting" } }
            @if model.queue_counts.is_empty() {
                p .muted { "nothing waiting" }
            } @else {
                table .counts {
                    thead { tr { th { "repo" } th { "priority" } th { "waiting" } } }
                    tbody { @for ((repo, priority), count) in &model.queue_counts {
                        tr { td { (repo) } td { (priority.as_str()) } td { (count) } }
                    } }
                }
                table {
                    thead { tr { th { "request" } th { "repo" } th { "target" } th { "priority" } th { "by" } th { "waiting for" } } }
                    tbody { @for request in &model.queued {
                        tr { td { code { (request.id) } } td { (request.repo) } td { (request.target.as_str()) }
                             td { (request.priority.as_str()) } td { (request.requested_by.as_deref().unwrap_or("")) }
                             td { (age(now - request.queued_at)) } }
                    } }
                }
                @if (model.queued.len() as u64) < model.queue_total {
                    p .muted { "first " (model.queued.len()) " of " (model.queue_total) " shown" }
                }
            }
        }
    }
}

fn running(model: &Model, now: OffsetDateTime) -> Markup {
    let running = model.running();
    html! {
        section #running {
            h2 { "Running " span .count { (running.len()) } }
            @if running.is_empty() { p .muted { "no build is running" } }
            @for build in running { (build_card(build, now)) }
        }
    }
}

fn build_card(build: &BuildView, now: OffsetDateTime) -> Markup {
    let state = &build.state;
    html! {
        article .build data-id=(state.id) {
            h3 {
                a href={"/builds/" (state.id)} { (state.repo) " " (state.target) }
                " " span class={"badge " (state.phase.as_str())} { (phase_label(build)) }
            }
            p .muted {
                @if let Some(builder) = &state.builder { "on " (builder) " · " }
                @if let Some(rev) = &state.rev { "rev " code { (short(rev)) } " · " }
                @if let Some(started) = state.started_at { "started " (age(now - started)) " ago" }
            }
            table .hosts { tbody { @for host in &build.hosts { (host_row(host)) } } }
        }
    }
}

fn phase_label(build: &BuildView) -> &'static str {
    match build.state.phase {
        RequestPhase::Queued if build.state.started_at.is_some() => "requeued",
        phase => phase.as_str(),
    }
}

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

fn host_row(host: &HostView) -> Markup {
    let (label, class) = match (host.status, host.running) {
        (Some(status), _) => (status.as_str(), status_class(status)),
        (None, true) => ("building", "building"),
        (None, false) => ("queued", "queued"),
    };
    let percent = match (host.done.min(host.expected) * 100).checked_div(host.expected) {
        Some(percent) => percent,
        None if host.status.is_some_and(HostStatus::is_success) => 100,
        None => 0,
    };
    html! {
        tr .host data-host=(host.name) data-status=(label) {
            td .name { (host.name) }
            td { span class={"badge " (class)} { (label) } }
            td .bar {
                @if host.running || host.expected > 0 {
                    progress max=(host.expected.max(1)) value=(host.done.min(host.expected)) { (percent) "%" }
                    " " span .derivations { (host.done) "/" (host.expected) " derivations" }
                }
            }
            td { @if let Some(ms) = host.duration_ms { (seconds(ms)) } }
            td .changes title="closure diff against this host's previous build" {
                @if let Some(changes) = &host.changes { (changes) }
            }
            td .error { @if let Some(error) = &host.error { (last_line(error)) } }
        }
    }
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
}

fn status_class(status: HostStatus) -> &'static str {
    match status {
        HostStatus::Built | HostStatus::Cached => "ok",
        HostStatus::Cancelled => "cancelled",
        HostStatus::BuildFailed | HostStatus::EvalFailed | HostStatus::TimedOut => "failed",
    }
}

pub(crate) fn recent(model: &Model) -> Markup {
    let recent = model.recent();
    html! {
        section #recent {
            h2 { "Recent results" }
            @if recent.is_empty() { p .muted { "no finished build yet" } }
            @else {
                table {
                    thead { tr { th { "build" } th { "status" } th { "finished" } th { "duration" } th { "hosts" } } }
                    tbody { @for build in recent {
                        tr .result data-id=(build.state.id) {
                            td { a href={"/builds/" (build.state.id)} { (build.state.repo) " " (build.state.target) } }
                            td { span class={"badge " (build.state.phase.as_str())} { (build.state.phase.as_str()) } }
                            td { @if let Some(at) = build.state.finished_at { (clock(at)) } }
                            td { @if let Some(ms) = build.duration_ms { (seconds(ms)) } }
                            td { @for host in &build.hosts {
                                span class={"chip " (host.status.map(status_class).unwrap_or("queued"))}
                                     title=(host.error.as_deref().map(last_line).unwrap_or("")) {
                                    (host.name) " " (host.status.map(|s| s.as_str()).unwrap_or("—"))
                                    @if let Some(ms) = host.duration_ms { " " (seconds(ms)) }
                                    @if let Some(changes) = &host.changes { " · " span .changes { (changes) } }
                                }
                            }
                            @if let Some(error) = &build.state.error { span .error { (last_line(error)) } } }
                        }
                    } }
                }
            }
        }
    }
}

fn clock(at: OffsetDateTime) -> String {
    format!("{:02}:{:02}:{:02} UTC", at.hour(), at.minute(), at.second())
}

fn charts(model: &Model, now: OffsetDateTime) -> Markup {
    html! {
        section #charts {
            h2 { "Charts" }
            div .charts {
                figure {
                    (queue_chart(model, now))
                    figcaption { "queue depth, last hour (sampled every 10 s)" }
                }
                @for (host, points) in &model.durations {
                    figure .duration data-host=(host) {
                        (duration_chart(points.iter().map(|p| (p.duration_ms, p.status, p.id.as_str()))))
                        figcaption { (host) " · last " (points.len()) " builds" }
                    }
                }
            }
        }
    }
}

const CHART_W: f64 = 240.0;
const CHART_H: f64 = 60.0;

fn queue_chart(model: &Model, now: OffsetDateTime) -> Markup {
    let window = QUEUE_WINDOW.whole_seconds() as f64;
    let max = model
        .queue_samples
        .iter()
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let points: Vec<String> = model
        .queue_samples
        .iter()
        .map(|(at, n)| {
            let x = CHART_W - ((now - *at).whole_seconds() as f64 / window * CHART_W).min(CHART_W);
            let y = CHART_H - (*n as f64 / max * (CHART_H - 4.0));
            format!("{x:.1},{y:.1}")
        })
        .collect();
    html! {
        svg .chart viewBox={"0 0 " (CHART_W) " " (CHART_H + 12.0)} width=(CHART_W) height=(CHART_H + 12.0) role="img" aria-label="queue depth over the last hour" {
            line x1="0" y1=(CHART_H) x2=(CHART_W) y2=(CHART_H) .axis {}
            @if !points.is_empty() { polyline points=(points.join(" ")) .line {} }
            text x="0" y=(CHART_H + 11.0) { "-60 min" }
            text x=(CHART_W) y=(CHART_H + 11.0) text-anchor="end" { "now" }
            text x="2" y="9" { "max " (max as u64) }
        }
    }
}

fn duration_chart<'a>(points: impl Iterator<Item = (u64, HostStatus, &'a str)>) -> Markup {
    let points: Vec<(u64, HostStatus, &str)> = points.collect();
    let max = points.iter().map(|p| p.0).max().unwrap_or(0).max(1);
    // At least ten slots: one early build is a bar, not a block.
    let slot = CHART_W / points.len().max(10) as f64;
    html! {
        svg .chart viewBox={"0 0 " (CHART_W) " " (CHART_H + 12.0)} width=(CHART_W) height=(CHART_H + 12.0) role="img" aria-label="build durations" {
            line x1="0" y1=(CHART_H) x2=(CHART_W) y2=(CHART_H) .axis {}
            @for (i, (ms, status, id)) in points.iter().enumerate() {
                @let h = (*ms as f64 / max as f64 * (CHART_H - 12.0)).max(1.0);
                rect x=(format!("{:.1}", i as f64 * slot + 1.0)) y=(format!("{:.1}", CHART_H - h))
                     width=(format!("{:.1}", (slot - 2.0).max(1.0))) height=(format!("{h:.1}"))
                     class=(status_class(*status)) {
                    title { (id) ": " (status.as_str()) ", " (seconds(*ms)) }
                }
            }
            text x="2" y="9" { "max " (seconds(max)) }
        }
    }
}

/// The summary section of one build's page (`None`: the dashboard does not know it).
pub fn build_section(build: Option<&BuildView>, id: &str, now: OffsetDateTime) -> String {
    html! {
        div #build {
            @match build {
                Some(build) => {
                    (build_card(build, now))
                    @if let Some(error) = &build.state.error { pre .error { (error) } }
                    @if let Some(by) = &build.state.requested_by { p .muted { "requested by " (by) } }
                }
                None => p .muted { "request " code { (id) } " is not among the running and recent builds this dashboard keeps; its log follows if the events stream still holds it" },
            }
        }
    }
    .into_string()
}

/// One build's page: its summary and its log so far (`cut`: earlier lines left out).
pub fn build_page(id: &str, build: &str, log: &[LogLine], cut: bool, after: u64) -> Markup {
    layout(
        &format!("build {id} · homelab-deploy"),
        &format!("/builds/{id}/events?after={after}"),
        html! {
            (PreEscaped(build))
            section #log-section {
                h2 { "Log" }
                @if cut { p .muted { "earlier lines left out (`homelab-deploy logs " (id) "` prints them all)" } }
                pre #log data-max-lines="5000" {
                    @for line in log { span .line { span .host { (line.host) } " " (line.text) } "\n" }
                }
            }
        },
    )
}
