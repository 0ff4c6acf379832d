//! The status page (`/`): what runs where (apps, deployments and their drift, hosts with their
//! state and releases), the rollouts under way with their waves, and the recent events.
//! [`snapshot`] reads it all once into a [`StatusView`]; [`render`] writes it as HTML on the
//! server, so the page shows everything without JavaScript; [`SCRIPT`] (no build step, no
//! dependencies) then fetches the same view from `/api/status` every second and redraws the
//! sections from it, so the page follows a rollout without a reload. Everything shown is
//! escaped: names and messages come from agents and operators.

use crate::fleet_state::FleetState;
use crate::http::InProgress;
use crate::model::HostResult;
use crate::store::StoreError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// How many of the latest events the page shows.
pub const RECENT_EVENTS: usize = 30;

#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    pub generated_unix_ms: i64,
    pub apps: Vec<AppView>,
    pub deployments: Vec<DeploymentView>,
    pub hosts: Vec<HostView>,
    pub rollouts: Vec<RolloutView>,
    pub events: Vec<EventView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AppView {
    pub name: String,
    /// `release: n hosts` of what its instances run, as reported.
    pub running: Vec<String>,
    pub rollout: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeploymentView {
    pub app: String,
    pub selector: String,
    pub release: String,
    pub hosts_matching: u32,
    pub hosts_healthy: u32,
    pub drift: Vec<HostWhy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostWhy {
    pub host: String,
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub name: String,
    pub state: String,
    pub connected: bool,
    pub labels: String,
    pub instances: Vec<InstanceView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub app: String,
    pub release: String,
    pub state: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    pub id: String,
    pub app: String,
    pub release: String,
    pub state: String,
    pub started_by: String,
    pub is_rollback: bool,
    pub message: String,
    /// Seconds left of the pause after the canary (`--pause-after-canary`), 0 when none.
    pub canary_pause_left_secs: i64,
    pub waves: Vec<WaveView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WaveView {
    pub label: String,
    pub state: String,
    pub current: bool,
    pub hosts: Vec<WaveHostView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WaveHostView {
    pub host: String,
    pub result: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub seq: u64,
    pub unix_ms: i64,
    pub kind: String,
    pub actor: String,
    pub app: String,
    pub host: String,
    pub message: String,
}

/// Reads what the page shows. Blocking (store reads): call it on the blocking pool.
pub fn snapshot(fleet: &FleetState, in_progress: &InProgress) -> Result<StatusView, StoreError> {
    let mut hosts = Vec::new();
    let mut running: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    for record in fleet.host_records()? {
        let instances: Vec<InstanceView> = fleet
            .instances(&record.name)
            .into_values()
            .map(|i| {
                *running
                    .entry(i.app.clone())
                    .or_default()
                    .entry(i.version.clone())
                    .or_default() += 1;
                InstanceView {
                    app: i.app,
                    release: i.version,
                    state: i.state.as_str().to_string(),
                    message: i.message,
                }
            })
            .collect();
        hosts.push(HostView {
            state: fleet.host_state(&record).as_str().to_string(),
            connected: fleet.is_connected(&record.name),
            labels: fleet_proto::names::format_labels(&record.labels),
            name: record.name,
            instances,
        });
    }
    let deployments: Vec<DeploymentView> = crate::converge::report(fleet, None)?
        .into_iter()
        .map(|r| DeploymentView {
            selector: r.deployment.selector_text(),
            app: r.deployment.app,
            release: r.deployment.version,
            hosts_matching: r.hosts_matching,
            hosts_healthy: r.hosts_healthy,
            drift: r
                .drift
                .into_iter()
                .map(|(host, why)| HostWhy { host, why })
                .collect(),
        })
        .collect();
    let mut rollouts = Vec::new();
    for (id, _) in in_progress.list() {
        let Some(record) = fleet.rollout(&id)? else {
            continue;
        };
        if record.state.is_final() {
            continue;
        }
        let waves = record
            .waves
            .iter()
            .enumerate()
            .map(|(idx, wave)| WaveView {
                label: crate::step::wave_label(&record, idx),
                state: wave.state.as_str().to_string(),
                current: idx == record.current_wave,
                hosts: wave
                    .hosts
                    .iter()
                    .map(|h| WaveHostView {
                        host: h.host.clone(),
                        result: h.result.as_str().to_string(),
                        message: if h.result == HostResult::Pending {
                            String::new()
                        } else {
                            h.message.clone()
                        },
                    })
                    .collect(),
            })
            .collect();
        rollouts.push(RolloutView {
            id: record.id,
            app: record.app,
            release: record.version,
            state: record.state.as_str().to_string(),
            started_by: record.started_by,
            is_rollback: record.is_rollback,
            message: record.message,
            canary_pause_left_secs: ((record.hold_until_unix_ms - fleet_proto::now_unix_ms())
                .max(0)
                + 999)
                / 1000,
            waves,
        });
    }
    let mut app_names: std::collections::BTreeSet<String> =
        deployments.iter().map(|d| d.app.clone()).collect();
    app_names.extend(running.keys().cloned());
    app_names.extend(rollouts.iter().map(|r| r.app.clone()));
    let apps = app_names
        .into_iter()
        .map(|name| AppView {
            running: running
                .get(&name)
                .map(|by_release| {
                    by_release
                        .iter()
                        .map(|(release, n)| format!("{release}: {n} host(s)"))
                        .collect()
                })
                .unwrap_or_default(),
            rollout: rollouts
                .iter()
                .find(|r| r.app == name)
                .map(|r| format!("{} to {} ({})", r.id, r.release, r.state)),
            name,
        })
        .collect();
    let mut events: Vec<EventView> = fleet
        .recent_events(RECENT_EVENTS)?
        .into_iter()
        .map(|e| EventView {
            seq: e.seq,
            unix_ms: e.unix_ms,
            kind: e.kind,
            actor: e.actor,
            app: e.app,
            host: e.host,
            message: e.message,
        })
        .collect();
    events.reverse();
    Ok(StatusView {
        generated_unix_ms: fleet_proto::now_unix_ms(),
        apps,
        deployments,
        hosts,
        rollouts,
        events,
    })
}

/// Escapes text for HTML (element content and quoted attributes).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The whole page, as the server renders it. The markup of each section is what
/// [`SCRIPT`] draws from `/api/status`: keep the two alike.
pub fn render(view: &StatusView) -> String {
    let mut page = String::new();
    page.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fleet status</title>\n<link rel=\"stylesheet\" href=\"/status.css\"><script src=\"/status.js\" defer></script></head>\n<body>\n<h1>fleet</h1>\n<p class=\"meta\">updated <span id=\"updated\" data-unix-ms=\"");
    let _ = write!(page, "{}", view.generated_unix_ms);
    page.push_str("\"></span> · live refreshes: <span id=\"refreshes\">0</span></p>\n");
    let _ = write!(
        page,
        "<section id=\"rollouts\">{}</section>\n<section id=\"apps\">{}</section>\n<section id=\"deployments\">{}</section>\n<section id=\"hosts\">{}</section>\n<section id=\"events\">{}</section>\n",
        rollouts_html(view),
        apps_html(view),
        deployments_html(view),
        hosts_html(view),
        events_html(view)
    );
    page.push_str("</body></html>\n");
    page
}

fn rollouts_html(view: &StatusView) -> String {
    let mut html = String::from("<h2>Rollouts in progress</h2>");
    if view.rollouts.is_empty() {
        html.push_str("<p class=\"none\">none</p>");
    }
    for r in &view.rollouts {
        let _ = write!(
            html,
            "<div class=\"rollout\" data-rollout=\"{}\"><h3>{} {} of {} to {} <span class=\"state {}\">{}</span></h3><p>started by {}{}{}</p><ol class=\"waves\">",
            escape(&r.id),
            if r.is_rollback { "rollback" } else { "rollout" },
            escape(&r.id),
            escape(&r.app),
            escape(&r.release),
            escape(&r.state),
            escape(&r.state),
            escape(&r.started_by),
            if r.message.is_empty() {
                String::new()
            } else {
                format!(": {}", escape(&r.message))
            },
            if r.canary_pause_left_secs > 0 {
                format!(
                    " · <span class=\"hold\">canary pause: {}s left</span>",
                    r.canary_pause_left_secs
                )
            } else {
                String::new()
            }
        );
        for w in &r.waves {
            let _ = write!(
                html,
                "<li class=\"wave {}{}\" data-wave-state=\"{}\"><b>{}</b> <span class=\"state {}\">{}</span>{}: ",
                escape(&w.state),
                if w.current { " current" } else { "" },
                escape(&w.state),
                escape(&w.label),
                escape(&w.state),
                escape(&w.state),
                if w.current { " ◀ now" } else { "" }
            );
            for h in &w.hosts {
                let _ = write!(
                    html,
                    "<span class=\"host {}\" title=\"{}\">{} ({})</span> ",
                    escape(&h.result),
                    escape(&h.message),
                    escape(&h.host),
                    escape(&h.result)
                );
            }
            html.push_str("</li>");
        }
        html.push_str("</ol></div>");
    }
    html
}

fn apps_html(view: &StatusView) -> String {
    let mut html =
        String::from("<h2>Apps</h2><table><tr><th>app</th><th>running</th><th>rollout</th></tr>");
    for a in &view.apps {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&a.name),
            escape(&a.running.join(", ")),
            escape(a.rollout.as_deref().unwrap_or("")),
        );
    }
    html.push_str("</table>");
    html
}

fn deployments_html(view: &StatusView) -> String {
    let mut html = String::from("<h2>Deployments</h2><table><tr><th>app</th><th>selector</th><th>release</th><th>healthy</th><th>drift</th></tr>");
    for d in &view.deployments {
        let drift: Vec<String> = d
            .drift
            .iter()
            .map(|h| format!("{}: {}", h.host, h.why))
            .collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}/{}</td><td class=\"drift\">{}</td></tr>",
            escape(&d.app),
            escape(&d.selector),
            escape(&d.release),
            d.hosts_healthy,
            d.hosts_matching,
            escape(&drift.join("; ")),
        );
    }
    html.push_str("</table>");
    html
}

fn hosts_html(view: &StatusView) -> String {
    let mut html = String::from("<h2>Hosts</h2><table><tr><th>host</th><th>state</th><th>labels</th><th>instances</th></tr>");
    for h in &view.hosts {
        let instances: Vec<String> = h
            .instances
            .iter()
            .map(|i| format!("{}@{} {}", i.app, i.release, i.state))
            .collect();
        let _ = write!(
            html,
            "<tr data-host=\"{}\"><td>{}</td><td class=\"state {}\">{}{}</td><td>{}</td><td>{}</td></tr>",
            escape(&h.name),
            escape(&h.name),
            escape(&h.state),
            escape(&h.state),
            if h.connected { "" } else { " (disconnected)" },
            escape(&h.labels),
            escape(&instances.join(", ")),
        );
    }
    html.push_str("</table>");
    html
}

fn events_html(view: &StatusView) -> String {
    let mut html = String::from(
        "<h2>Recent events</h2><table><tr><th>#</th><th>kind</th><th>by</th><th>what</th></tr>",
    );
    for e in &view.events {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.seq,
            escape(&e.kind),
            escape(&e.actor),
            escape(&e.message),
        );
    }
    html.push_str("</table>");
    html
}

/// The page's script: every second, fetch `/api/status` and redraw each section with the same
/// markup the server wrote.
pub const SCRIPT: &str = r#"// fleet status page: redraws from /api/status every second. No dependencies.
"use strict";
(function () {
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  let refreshes = 0;
  function rollouts(v) {
    let h = "<h2>Rollouts in progress</h2>";
    if (v.rollouts.length === 0) h += '<p class="none">none</p>';
    for (const r of v.rollouts) {
      h += `<div class="rollout" data-rollout="${esc(r.id)}"><h3>${r.is_rollback ? "rollback" : "rollout"} ${esc(r.id)} of ${esc(r.app)} to ${esc(r.release)} <span class="state ${esc(r.state)}">${esc(r.state)}</span></h3><p>started by ${esc(r.started_by)}${r.message ? ": " + esc(r.message) : ""}${r.canary_pause_left_secs > 0 ? ` · <span class="hold">canary pause: ${r.canary_pause_left_secs}s left</span>` : ""}</p><ol class="waves">`;
      for (const w of r.waves) {
        h += `<li class="wave ${esc(w.state)}${w.current ? " current" : ""}" data-wave-state="${esc(w.state)}"><b>${esc(w.label)}</b> <span class="state ${esc(w.state)}">${esc(w.state)}</span>${w.current ? " ◀ now" : ""}: `;
        for (const x of w.hosts) h += `<span class="host ${esc(x.result)}" title="${esc(x.message)}">${esc(x.host)} (${esc(x.result)})</span> `;
        h += "</li>";
      }
      h += "</ol></div>";
    }
    return h;
  }
  function apps(v) {
    let h = "<h2>Apps</h2><table><tr><th>app</th><th>running</th><th>rollout</th></tr>";
    for (const a of v.apps) h += `<tr><td>${esc(a.name)}</td><td>${esc(a.running.join(", "))}</td><td>${esc(a.rollout || "")}</td></tr>`;
    return h + "</table>";
  }
  function deployments(v) {
    let h = "<h2>Deployments</h2><table><tr><th>app</th><th>selector</th><th>release</th><th>healthy</th><th>drift</th></tr>";
    for (const d of v.deployments) {
      const drift = d.drift.map((x) => x.host + ": " + x.why).join("; ");
      h += `<tr><td>${esc(d.app)}</td><td>${esc(d.selector)}</td><td>${esc(d.release)}</td><td>${d.hosts_healthy}/${d.hosts_matching}</td><td class="drift">${esc(drift)}</td></tr>`;
    }
    return h + "</table>";
  }
  function hosts(v) {
    let h = "<h2>Hosts</h2><table><tr><th>host</th><th>state</th><th>labels</th><th>instances</th></tr>";
    for (const x of v.hosts) {
      const inst = x.instances.map((i) => `${i.app}@${i.release} ${i.state}`).join(", ");
      h += `<tr data-host="${esc(x.name)}"><td>${esc(x.name)}</td><td class="state ${esc(x.state)}">${esc(x.state)}${x.connected ? "" : " (disconnected)"}</td><td>${esc(x.labels)}</td><td>${esc(inst)}</td></tr>`;
    }
    return h + "</table>";
  }
  function events(v) {
    let h = "<h2>Recent events</h2><table><tr><th>#</th><th>kind</th><th>by</th><th>what</th></tr>";
    for (const e of v.events) h += `<tr><td>${e.seq}</td><td>${esc(e.kind)}</td><td>${esc(e.actor)}</td><td>${esc(e.message)}</td></tr>`;
    return h + "</table>";
  }
  const sections = {rollouts, apps, deployments, hosts, events};
  function showTime(ms) {
    const el = document.getElementById("updated");
    el.dataset.unixMs = ms;
    el.textContent = new Date(ms).toLocaleTimeString();
  }
  async function refresh() {
    try {
      const answer = await fetch("/api/status", {cache: "no-store"});
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      const v = await answer.json();
      for (const [id, draw] of Object.entries(sections)) document.getElementById(id).innerHTML = draw(v);
      showTime(v.generated_unix_ms);
      refreshes += 1;
      document.getElementById("refreshes").textContent = String(refreshes);
      document.body.classList.remove("stale");
    } catch (e) {
      document.body.classList.add("stale");
    }
  }
  showTime(Number(document.getElementById("updated").dataset.unixMs));
  refresh();
  setInterval(refresh, 1000);
})();
"#;

/// The page's style.
pub const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin-bottom:1em}td,th{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}\
.meta{color:#666}.stale .meta::after{content:' (the controller does not answer)';color:#b00}\
.state.ready,.state.running,.state.passed,.host.passed{color:#070}.state.lost,.state.failed,.host.failed{color:#b00}\
.state.paused,.state.draining,.state.drained,.host.deploying{color:#a60}.wave.current{font-weight:bold}\
.drift,.hold{color:#a60}.none{color:#666}\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_agents_and_operators_wrote() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        let view = StatusView {
            generated_unix_ms: 0,
            apps: vec![],
            deployments: vec![],
            hosts: vec![HostView {
                name: "h1".into(),
                state: "ready".into(),
                connected: true,
                labels: "env=prod".into(),
                instances: vec![InstanceView {
                    app: "web".into(),
                    release: "1.0".into(),
                    state: "failed".into(),
                    message: "<img src=x>".into(),
                }],
            }],
            rollouts: vec![],
            events: vec![EventView {
                seq: 1,
                unix_ms: 0,
                kind: "instance.failed".into(),
                actor: "h1".into(),
                app: "web".into(),
                host: "h1".into(),
                message: "<img src=x onerror=alert(1)>".into(),
            }],
        };
        let mut view = view;
        view.rollouts.push(RolloutView {
            id: "r3".into(),
            app: "web".into(),
            release: "2.0".into(),
            state: "running".into(),
            started_by: "ann".into(),
            is_rollback: false,
            message: String::new(),
            canary_pause_left_secs: 30,
            waves: vec![
                WaveView {
                    label: "canary (wave 1/2)".into(),
                    state: "passed".into(),
                    current: false,
                    hosts: vec![WaveHostView {
                        host: "h1".into(),
                        result: "passed".into(),
                        message: String::new(),
                    }],
                },
                WaveView {
                    label: "wave 2/2".into(),
                    state: "pending".into(),
                    current: true,
                    hosts: vec![],
                },
            ],
        });
        let page = render(&view);
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("canary pause: 30s left"), "{page}");
        assert!(
            page.contains(
                "<li class=\"wave pending current\" data-wave-state=\"pending\"><b>wave 2/2</b>"
            ),
            "{page}"
        );
        assert!(page.contains("h1 (passed)"), "{page}");
        assert!(page.contains("web@1.0 failed"), "{page}");
    }
}
