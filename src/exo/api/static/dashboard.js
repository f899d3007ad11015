// The exo dashboard: one page, no build step. It reads the node's live view from
// GET state/stream (server-sent events, read with fetch so that an API key can go in the
// Authorization header) and talks to the same API the CLI and curl use.
"use strict";

const HISTORY = 60; // samples kept per device for the sparklines…
const SAMPLE_MS = 1000; // …one a second: the last minute
const STREAM_SILENCE_MS = 40000; // the node sends a keep-alive every 15 s
const KEY_STORE = "exo-api-key";
const PALETTE = [
  "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2",
  "#b279a2", "#eeca3b", "#9d755d", "#ff9da6", "#bab0ac",
];
const GIB = 1024 ** 3;

const page = {
  view: null,
  history: new Map(), // "node/device" -> [{at, mem, util, temp, power}]
  deviceColors: new Map(), // "node/device" -> colour
  models: [],
  armedDelete: null,
  chat: { messages: [], controller: null },
  connected: false,
  retryNow: null, // ends the wait before the next reconnection attempt
};

// ---------------------------------------------------------------- helpers

function $(id) {
  return document.getElementById(id);
}

// el("div", {class: "x", "data-k": "v", onclick: f}, child, "text", ...)
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "style") node.style.cssText = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function replace(container, ...children) {
  container.replaceChildren(...children.flat().filter((child) => child));
}

function bytes(value) {
  if (value === null || value === undefined) return "?";
  if (value === 0) return "0 B";
  if (value >= GIB) return `${(value / GIB).toFixed(1)} GiB`;
  if (value >= 1024 ** 2) return `${(value / 1024 ** 2).toFixed(0)} MiB`;
  return `${(value / 1024).toFixed(0)} KiB`;
}

function ms(value) {
  if (value === null || value === undefined) return "—";
  return value >= 100 ? `${value.toFixed(0)} ms` : `${value.toFixed(1)} ms`;
}

function tokensPerSecond(msPerToken) {
  return msPerToken ? `${(1000 / msPerToken).toFixed(1)} tok/s` : "—";
}

function clock(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleTimeString();
}

function short(id) {
  return id ? String(id).slice(0, 8) : "?";
}

function nodeName(nodeId) {
  const node = page.view && page.view.nodes[nodeId];
  return node ? node.friendly_name : short(nodeId);
}

function deviceKey(nodeId, deviceId) {
  return `${nodeId}/${deviceId}`;
}

function deviceLabel(nodeId, deviceId) {
  const info = page.view && (page.view.gpu_device_info[nodeId] || {})[deviceId];
  const name = info ? ` (${info.name})` : "";
  return `${nodeName(nodeId)} · ${deviceId}${name}`;
}

function colourOf(nodeId, deviceId) {
  return page.deviceColors.get(deviceKey(nodeId, deviceId)) || "#888";
}

function sleep(milliseconds) {
  return new Promise((resolve) => setTimeout(resolve, milliseconds));
}

// ---------------------------------------------------------------- API

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...authHeaders(), ...(options.headers || {}) },
  });
  if (response.status === 401) $("key-form").hidden = false;
  return response;
}

// The message of an error response: OpenAI's {"error": {"message"}} or {"detail": ...}.
async function errorText(response) {
  const text = await response.text();
  let message = text;
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && typeof body.detail === "string") message = body.detail;
    else if (body && body.detail !== undefined) message = JSON.stringify(body.detail);
  } catch {
    // not JSON: the text as it came
  }
  return `${response.status}: ${message || response.statusText}`;
}

// Read a text/event-stream body; onEvent(name, data) for each event; onBytes() on any bytes.
async function readEvents(response, onEvent, onBytes) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    if (onBytes) onBytes();
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      let name = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line === "" || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// ---------------------------------------------------------------- the live stream

function setConnection(connected, why) {
  page.connected = connected;
  const pill = $("connection");
  pill.textContent = connected ? "live" : "disconnected";
  pill.className = `pill ${connected ? "pill-ok" : "pill-bad"}`;
  const banner = $("banner");
  banner.hidden = connected;
  if (!connected) {
    banner.textContent = `Lost the live stream from the node (${why}); reconnecting…`;
  }
}

async function followState() {
  let delay = 1000;
  for (;;) {
    const controller = new AbortController();
    let silence = null;
    const arm = () => {
      clearTimeout(silence);
      silence = setTimeout(() => controller.abort(new Error("no data for 40 s")), STREAM_SILENCE_MS);
    };
    try {
      arm();
      const response = await api("state/stream", {
        signal: controller.signal,
        headers: { Accept: "text/event-stream" },
      });
      if (!response.ok) throw new Error(await errorText(response));
      await readEvents(
        response,
        (name, data) => {
          if (name !== "state") return;
          if (!page.connected) {
            setConnection(true);
            loadModels();
          }
          delay = 1000;
          onState(JSON.parse(data));
        },
        arm,
      );
      throw new Error("the node closed the stream");
    } catch (error) {
      const reason = controller.signal.aborted && controller.signal.reason
        ? controller.signal.reason.message
        : error.message;
      setConnection(false, reason || "connection failed");
    } finally {
      clearTimeout(silence);
      controller.abort();
    }
    await Promise.race([sleep(delay), new Promise((resolve) => { page.retryNow = resolve; })]);
    page.retryNow = null;
    delay = Math.min(delay * 2, 10000);
  }
}

function onState(view) {
  page.view = view;
  assignColours(view);
  if (page.history.size === 0) recordHistory(view);
  renderSummary(view);
  renderNodes(view);
  renderInstances(view);
  updateChatModels(view);
}

function allDevices(view) {
  const keys = [];
  const nodes = new Set([
    ...Object.keys(view.gpu_device_info),
    ...Object.keys(view.gpu_device_state),
  ]);
  for (const nodeId of [...nodes].sort()) {
    const ids = new Set([
      ...Object.keys(view.gpu_device_info[nodeId] || {}),
      ...Object.keys(view.gpu_device_state[nodeId] || {}),
    ]);
    for (const deviceId of [...ids].sort()) keys.push([nodeId, deviceId]);
  }
  return keys;
}

function assignColours(view) {
  for (const [nodeId, deviceId] of allDevices(view)) {
    const key = deviceKey(nodeId, deviceId);
    if (!page.deviceColors.has(key)) {
      page.deviceColors.set(key, PALETTE[page.deviceColors.size % PALETTE.length]);
    }
  }
}

// One sample per device per SAMPLE_MS while the stream is live: a device whose reading has
// not changed holds its value, so each sparkline spans the same last minute.
function recordHistory(view) {
  const seen = new Set();
  for (const [nodeId, readings] of Object.entries(view.gpu_device_state)) {
    for (const [deviceId, reading] of Object.entries(readings)) {
      const key = deviceKey(nodeId, deviceId);
      seen.add(key);
      const samples = page.history.get(key) || [];
      samples.push({
        mem: reading.memory_total_bytes
          ? (100 * reading.memory_used_bytes) / reading.memory_total_bytes
          : 0,
        util: reading.compute_utilization_percent,
        temp: reading.thermal_temperature_c >= 0 ? reading.thermal_temperature_c : null,
        power: reading.power_draw_watts,
      });
      if (samples.length > HISTORY) samples.splice(0, samples.length - HISTORY);
      page.history.set(key, samples);
    }
  }
  for (const key of page.history.keys()) if (!seen.has(key)) page.history.delete(key);
}

// ---------------------------------------------------------------- header

function renderSummary(view) {
  const tasks = view.tasks || {};
  const running = (tasks.running || 0) + (tasks.pending || 0);
  const items = [
    ["node", nodeName(view.node_id)],
    ["master", view.master_node_id ? nodeName(view.master_node_id) : "none elected"],
    ["nodes", Object.keys(view.nodes).length],
    ["event", view.last_event_applied_idx],
    ["tasks", `${running} active / ${tasks.total || 0}`],
  ];
  replace($("summary"), items.map(([term, value]) => el("div", {}, el("dt", {}, term), el("dd", {}, value))));
}

// ---------------------------------------------------------------- nodes and devices

function sparkline(values, max, colour, label) {
  const width = 110;
  const height = 22;
  const box = svg("svg", {
    class: "spark",
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    "aria-label": label,
  });
  box.append(svg("rect", { x: 0, y: 0, width, height, class: "spark-bg" }));
  const known = values.map((value, index) => [index, value]).filter(([, value]) => value !== null && value !== undefined);
  if (known.length === 0) return box;
  const top = Math.max(max || 0, ...known.map(([, value]) => value), 1);
  const step = width / Math.max(HISTORY - 1, 1);
  const offset = (HISTORY - values.length) * step;
  const points = known.map(([index, value]) => {
    const x = offset + index * step;
    const y = height - 2 - (value / top) * (height - 4);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  if (points.length === 1) points.push(points[0].replace(/^[^,]+/, (x) => String(Number(x) + 1)));
  box.append(svg("polyline", { points: points.join(" "), fill: "none", stroke: colour, "stroke-width": 1.5 }));
  return box;
}

function bar(fraction, kind) {
  const share = Math.max(0, Math.min(1, fraction || 0));
  return el("div", { class: `bar ${kind || ""}` }, el("div", { class: "bar-fill", style: `width:${(share * 100).toFixed(1)}%` }));
}

function metric(label, valueText, barNode, spark, cls) {
  return el(
    "div",
    { class: `metric ${cls || ""}` },
    el(
      "div",
      { class: "metric-head" },
      el("span", { class: "metric-label" }, label),
      el("span", { class: "metric-value" }, valueText),
    ),
    barNode || el("span", { class: "bar-none" }),
    spark || el("span", { class: "spark-none" }),
  );
}

function deviceCard(nodeId, deviceId, info, reading) {
  const key = deviceKey(nodeId, deviceId);
  const samples = page.history.get(key) || [];
  const colour = colourOf(nodeId, deviceId);
  const throttling = reading ? reading.is_thermal_throttling || reading.throttle_reasons.length > 0 : false;
  const card = el("article", {
    class: `device${throttling ? " throttling" : ""}`,
    "data-device": key,
    "data-throttling": throttling ? "true" : "false",
  });
  const title = el(
    "header",
    {},
    el("span", { class: "swatch", style: `background:${colour}` }),
    el("strong", { class: "device-name" }, info ? info.name : deviceId),
    el("span", { class: "muted" }, ` ${deviceId}`),
    info && info.backend !== "simulated" ? el("span", { class: "tag" }, info.backend) : null,
    (info && info.is_simulated) || (reading && reading.is_simulated) ? el("span", { class: "tag" }, "simulated") : null,
  );
  card.append(title);
  if (!reading) {
    card.append(el("p", { class: "empty" }, "no reading yet"));
    return card;
  }
  const memShare = reading.memory_total_bytes ? reading.memory_used_bytes / reading.memory_total_bytes : 0;
  card.append(
    metric(
      "memory",
      `${bytes(reading.memory_used_bytes)} / ${bytes(reading.memory_total_bytes)}`,
      bar(memShare, memShare > 0.9 ? "hot" : ""),
      sparkline(samples.map((s) => s.mem), 100, colour, "memory used, %"),
      "metric-memory",
    ),
  );
  card.append(
    metric(
      "utilisation",
      `${reading.compute_utilization_percent.toFixed(0)} %`,
      bar(reading.compute_utilization_percent / 100),
      sparkline(samples.map((s) => s.util), 100, colour, "utilisation, %"),
      "metric-util",
    ),
  );
  const temp = reading.thermal_temperature_c;
  const limit = reading.thermal_throttle_threshold_c;
  const tempShare = temp >= 0 && limit > 0 ? temp / limit : 0;
  card.append(
    metric(
      "temperature",
      temp >= 0 ? `${temp.toFixed(0)} °C / ${limit.toFixed(0)} °C` : `unknown / ${limit.toFixed(0)} °C`,
      bar(tempShare, tempShare >= 1 ? "hot" : tempShare >= 0.85 ? "warm" : ""),
      sparkline(samples.map((s) => s.temp), limit, colour, "temperature, °C"),
      "metric-temp",
    ),
  );
  const draw = reading.power_draw_watts;
  const cap = reading.power_limit_watts;
  card.append(
    metric(
      "power",
      draw !== null && draw !== undefined
        ? `${draw.toFixed(0)} W${cap ? ` / ${cap.toFixed(0)} W` : ""}`
        : "not reported",
      draw !== null && draw !== undefined && cap ? bar(draw / cap) : null,
      draw !== null && draw !== undefined ? sparkline(samples.map((s) => s.power), cap, colour, "power, W") : null,
      "metric-power",
    ),
  );
  const reasons = reading.throttle_reasons || [];
  card.append(
    el(
      "div",
      { class: `throttle ${throttling ? "on" : "off"}` },
      throttling ? el("span", { class: "badge bad" }, "throttling") : el("span", { class: "badge ok" }, "not throttling"),
      reasons.length ? el("span", { class: "reasons" }, ` ${reasons.join(", ")}`) : null,
    ),
  );
  card.append(el("footer", { class: "muted" }, `reading at ${clock(reading.last_update)}`));
  return card;
}

function renderNodes(view) {
  const nodeIds = new Set([
    ...Object.keys(view.nodes),
    ...Object.keys(view.gpu_device_info),
    ...Object.keys(view.gpu_device_state),
  ]);
  if (nodeIds.size === 0) {
    replace($("nodes-body"), el("p", { class: "empty" }, "No nodes yet: start one with uv run exo."));
    return;
  }
  const ordered = [...nodeIds].sort((a, b) => nodeName(a).localeCompare(nodeName(b)) || a.localeCompare(b));
  const cards = ordered.map((nodeId) => {
    const node = view.nodes[nodeId];
    const infos = view.gpu_device_info[nodeId] || {};
    const readings = view.gpu_device_state[nodeId] || {};
    const deviceIds = [...new Set([...Object.keys(infos), ...Object.keys(readings)])].sort();
    const facts = node
      ? [
          node.hostname,
          node.os,
          `${node.cpu_count} CPUs`,
          `RAM ${bytes(node.ram_available_bytes)} free of ${bytes(node.ram_total_bytes)}`,
          node.execution && node.execution.mlx_build ? `MLX ${node.execution.mlx_build}` : null,
        ].filter(Boolean).join(" · ")
      : "node info not reported yet";
    return el(
      "article",
      { class: "node", "data-node": nodeId, style: `--devices:${Math.max(1, Math.min(deviceIds.length, 4))}` },
      el(
        "header",
        {},
        el("strong", {}, nodeName(nodeId)),
        el("span", { class: "muted mono" }, ` ${short(nodeId)}`),
        nodeId === view.master_node_id ? el("span", { class: "badge master" }, "master") : null,
        nodeId === view.node_id ? el("span", { class: "badge" }, "this node") : null,
      ),
      el("p", { class: "muted facts" }, facts),
      node && node.execution && node.execution.error ? el("p", { class: "error" }, node.execution.error) : null,
      deviceIds.length
        ? el("div", { class: "devices" }, deviceIds.map((id) => deviceCard(nodeId, id, infos[id], readings[id])))
        : el("p", { class: "empty" }, "no devices reported yet"),
    );
  });
  replace($("nodes-body"), cards);
}

// ---------------------------------------------------------------- instances

function runnerCell(runner) {
  if (!runner) return el("span", { class: "status status-none" }, "no runner yet");
  const parts = [el("span", { class: `status status-${runner.status}` }, runner.status)];
  const loaded = runner.loaded_bytes;
  const total = runner.total_bytes;
  if (loaded !== null && loaded !== undefined && total) {
    parts.push(
      el(
        "span",
        { class: "progress", title: `${bytes(loaded)} of ${bytes(total)}` },
        bar(loaded / total),
        el("span", { class: "muted" }, ` ${Math.round((100 * loaded) / total)} % of ${bytes(total)}`),
      ),
    );
  }
  if (runner.error) parts.push(el("div", { class: "error" }, runner.error));
  return el("span", { class: "runner", "data-runner": runner.runner_id, "data-status": runner.status }, parts);
}

function layerRange(shard) {
  return shard.end_layer - shard.start_layer === 1
    ? `layer ${shard.start_layer}`
    : `layers ${shard.start_layer}–${shard.end_layer - 1}`;
}

// A bar split by shard: each segment's width is its share of the layers.
function layerMap(shards, runners) {
  const ordered = [...shards].sort((a, b) => a.start_layer - b.start_layer);
  const total = Math.max(1, ...ordered.map((shard) => shard.end_layer));
  const map = el("div", { class: "layer-map", "data-layers": total });
  for (const shard of ordered) {
    const count = shard.end_layer - shard.start_layer;
    const runner = runners ? runners[shard.runner_id] : null;
    const label = layerRange(shard);
    map.append(
      el(
        "div",
        {
          class: `segment${runner ? ` runner-${runner.status}` : ""}`,
          style: `flex-grow:${count};background:${colourOf(shard.node_id, shard.device_id)}`,
          "data-node": shard.node_id,
          "data-device": shard.device_id,
          "data-range": `${shard.start_layer}-${shard.end_layer}`,
          title: `${deviceLabel(shard.node_id, shard.device_id)}: ${label} (${count} layers), rank ${shard.rank}`,
        },
        el("span", { class: "segment-layers" }, label),
        el("span", { class: "segment-device" }, deviceLabel(shard.node_id, shard.device_id)),
      ),
    );
  }
  return el(
    "div",
    { class: "layer-map-box" },
    map,
    el("div", { class: "axis muted" }, el("span", {}, "0"), el("span", {}, `${total} layers`)),
  );
}

function shardTable(shards, runners) {
  const rows = [...shards]
    .sort((a, b) => a.rank - b.rank)
    .map((shard) => {
      const runner = runners ? runners[shard.runner_id] : null;
      return el(
        "tr",
        {},
        el("td", {}, shard.rank),
        el("td", {}, el("span", { class: "swatch", style: `background:${colourOf(shard.node_id, shard.device_id)}` }), deviceLabel(shard.node_id, shard.device_id)),
        el("td", {}, layerRange(shard).replace(/^layers? /, "")),
        el("td", {}, runners ? runnerCell(runner) : "—"),
        el("td", {}, ms(shard.predicted_stage_ms)),
        el("td", {}, ms(shard.measured_stage_ms)),
      );
    });
  return el(
    "table",
    { class: "shards" },
    el(
      "thead",
      {},
      el("tr", {}, ["rank", "device", "layers", "runner", "predicted stage", "measured stage"].map((h) => el("th", {}, h))),
    ),
    el("tbody", {}, rows),
  );
}

function reasonsList(reasons) {
  if (!reasons || reasons.length === 0) return null;
  return el(
    "details",
    { class: "reasons-box", open: true },
    el("summary", {}, "why this placement"),
    el("ul", { class: "reasons" }, reasons.map((reason) => el("li", {}, reason))),
  );
}

function perfTable(instance) {
  const placement = instance.placement;
  const rows = [
    ["predicted", ms(placement.predicted_ms_per_token), tokensPerSecond(placement.predicted_ms_per_token)],
    ["measured", ms(instance.measured_ms_per_token), tokensPerSecond(instance.measured_ms_per_token)],
  ];
  const ttft = [placement.predicted_time_to_first_token_ms, instance.measured_time_to_first_token_ms];
  return el(
    "table",
    { class: "perf" },
    el("thead", {}, el("tr", {}, el("th", {}), el("th", {}, "ms / token"), el("th", {}, "tokens / s"), el("th", {}, "first token"))),
    el(
      "tbody",
      {},
      rows.map(([label, msText, tps], index) =>
        el("tr", { class: `perf-${label}` }, el("th", {}, label), el("td", {}, msText), el("td", {}, tps), el("td", {}, ms(ttft[index])))),
    ),
  );
}

function changeLine(change) {
  const gain = change.predicted_gain !== null && change.predicted_gain !== undefined
    ? ` · predicted ${Math.round(change.predicted_gain * 100)} % faster`
    : "";
  return el(
    "li",
    { class: `change change-${change.outcome}` },
    el("span", { class: "tag" }, change.kind),
    el("span", { class: `status status-${change.outcome}` }, change.outcome),
    ` ${clock(change.started_at)} — ${change.reason}`,
    el("span", { class: "muted" }, ` (${ms(change.old_predicted_ms)} → ${ms(change.new_predicted_ms)}${gain})`),
    change.outcome_reason ? el("div", { class: "muted" }, change.outcome_reason) : null,
  );
}

async function deleteInstance(instanceId, button) {
  if (page.armedDelete !== instanceId) {
    page.armedDelete = instanceId;
    button.textContent = "Click again to delete";
    setTimeout(() => {
      if (page.armedDelete === instanceId) page.armedDelete = null;
    }, 4000);
    return;
  }
  page.armedDelete = null;
  button.disabled = true;
  const response = await api(`instance/${encodeURIComponent(instanceId)}`, { method: "DELETE" });
  if (!response.ok) {
    const card = button.closest(".instance");
    if (card) card.append(el("p", { class: "error" }, `delete failed: ${await errorText(response)}`));
  }
}

function instanceCard(instance, health, runners) {
  const placement = instance.placement;
  const status = health ? health.status : "unknown";
  const deleteButton = el(
    "button",
    { type: "button", class: "danger small", onclick: (event) => deleteInstance(instance.instance_id, event.currentTarget) },
    page.armedDelete === instance.instance_id ? "Click again to delete" : "Delete",
  );
  const card = el(
    "article",
    { class: "instance", "data-instance": instance.instance_id, "data-model": instance.model_id, "data-health": status },
    el(
      "header",
      {},
      el("strong", {}, instance.model_id),
      el("span", { class: `badge health status-${status}` }, status),
      el("span", { class: "muted mono" }, ` ${short(instance.instance_id)}`),
      el("span", { class: "tag" }, placement.strategy),
      el("span", { class: "tag" }, placement.objective),
      placement.heterogeneous ? el("span", { class: "tag" }, "heterogeneous") : null,
      el("span", { class: "tag" }, `rebalance ${instance.rebalance}`),
      el("span", { class: "spacer" }),
      deleteButton,
    ),
  );
  if (health && health.reason) card.append(el("p", { class: status === "failed" ? "error" : "muted" }, health.reason));
  card.append(layerMap(instance.shards, runners));
  card.append(el("div", { class: "instance-grid" }, shardTable(instance.shards, runners), perfTable(instance)));
  card.append(reasonsList(placement.reasons) || el("span"));
  if (instance.incoming) {
    const incoming = instance.incoming;
    card.append(
      el(
        "div",
        { class: "incoming" },
        el("h4", {}, `${incoming.change.kind} in progress: `, el("span", { class: "muted" }, incoming.change.reason)),
        layerMap(incoming.shards, runners),
        shardTable(incoming.shards, runners),
      ),
    );
  }
  if (instance.retiring_shards && instance.retiring_shards.length) {
    card.append(
      el(
        "p",
        { class: "muted" },
        `retiring (finishing its requests): ${instance.retiring_shards.map((s) => deviceLabel(s.node_id, s.device_id)).join(", ")}`,
      ),
    );
  }
  if (instance.changes && instance.changes.length) {
    const recent = instance.changes.slice(-5).reverse();
    card.append(
      el(
        "details",
        { class: "changes" },
        el("summary", {}, `heals and moves (${instance.changes.length})`),
        el("ul", {}, recent.map(changeLine)),
      ),
    );
  }
  return card;
}

function renderInstances(view) {
  const instances = Object.values(view.instances).sort(
    (a, b) => a.model_id.localeCompare(b.model_id) || a.instance_id.localeCompare(b.instance_id),
  );
  if (instances.length === 0) {
    replace($("instances-body"), el("p", { class: "empty" }, "No instances — place a model below."));
    return;
  }
  // Keep the open/closed state of the details the user toggled.
  const open = new Map();
  for (const details of $("instances-body").querySelectorAll("details[data-key]")) {
    open.set(details.dataset.key, details.open);
  }
  const cards = instances.map((instance) => instanceCard(instance, view.instance_health[instance.instance_id], view.runners));
  for (const card of cards) {
    for (const details of card.querySelectorAll("details")) {
      const key = `${card.dataset.instance}/${details.className}`;
      details.dataset.key = key;
      if (open.has(key)) details.open = open.get(key);
    }
  }
  replace($("instances-body"), cards);
}

// ---------------------------------------------------------------- place a model

async function loadModels() {
  const select = $("place-model");
  try {
    const response = await api("v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    page.models = body.data || [];
  } catch (error) {
    replace($("place-result"), el("p", { class: "error" }, `could not list models: ${error.message}`));
    return;
  }
  const chosen = select.value;
  replace(
    select,
    page.models.length ? null : el("option", { value: "" }, "no models known"),
    page.models.map((model) =>
      el("option", { value: model.id }, `${model.id}${model.n_layers ? ` (${model.n_layers} layers)` : ""}`)),
  );
  if (chosen && page.models.some((model) => model.id === chosen)) select.value = chosen;
}

function placeRequest() {
  const typed = $("place-model-text").value.trim();
  const model = typed || $("place-model").value;
  const minNodes = Number.parseInt($("place-min-nodes").value, 10);
  return {
    model_id: model,
    min_nodes: Number.isFinite(minNodes) ? minNodes : 1,
    objective: $("place-objective").value,
  };
}

function placementView(title, instance) {
  const placement = instance.placement;
  return el(
    "div",
    { class: "placement-preview", "data-model": instance.model_id },
    el("h4", {}, title),
    layerMap(instance.shards, null),
    el(
      "p",
      {},
      `${placement.strategy}, ${placement.objective}: predicted ${ms(placement.predicted_ms_per_token)} per token `,
      `(${tokensPerSecond(placement.predicted_ms_per_token)})`,
      placement.predicted_time_to_first_token_ms ? `, first token ${ms(placement.predicted_time_to_first_token_ms)}` : "",
    ),
    reasonsList(placement.reasons),
  );
}

async function preview() {
  const request = placeRequest();
  const result = $("place-result");
  if (!request.model_id) {
    replace(result, el("p", { class: "error" }, "choose or type a model id"));
    return;
  }
  replace(result, el("p", { class: "muted" }, "asking for a dry run…"));
  const query = new URLSearchParams({
    model_id: request.model_id,
    min_nodes: String(request.min_nodes),
    objective: request.objective,
  });
  try {
    const response = await api(`instance/placement?${query}`);
    if (!response.ok) {
      replace(result, el("p", { class: "error" }, await errorText(response)));
      return;
    }
    replace(result, placementView(`Preview of ${request.model_id} (nothing created)`, await response.json()));
  } catch (error) {
    replace(result, el("p", { class: "error" }, `request failed: ${error.message}`));
  }
}

async function place(event) {
  event.preventDefault();
  const request = placeRequest();
  const result = $("place-result");
  if (!request.model_id) {
    replace(result, el("p", { class: "error" }, "choose or type a model id"));
    return;
  }
  const button = $("place-submit");
  button.disabled = true;
  replace(result, el("p", { class: "muted" }, `placing ${request.model_id}…`));
  try {
    const response = await api("instance", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    if (!response.ok) {
      replace(result, el("p", { class: "error" }, await errorText(response)));
      return;
    }
    const instance = await response.json();
    replace(result, placementView(`Placed ${instance.model_id} as ${short(instance.instance_id)}: its runners load now`, instance));
  } catch (error) {
    replace(result, el("p", { class: "error" }, `request failed: ${error.message}`));
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- chat

function updateChatModels(view) {
  const select = $("chat-model");
  const byModel = new Map();
  for (const instance of Object.values(view.instances)) {
    const status = (view.instance_health[instance.instance_id] || {}).status || "unknown";
    if (byModel.get(instance.model_id) !== "ready") byModel.set(instance.model_id, status);
  }
  const wanted = [...byModel.entries()].sort(([a], [b]) => a.localeCompare(b));
  const signature = JSON.stringify(wanted);
  if (select.dataset.signature === signature) return;
  select.dataset.signature = signature;
  const chosen = select.value;
  if (wanted.length === 0) {
    replace(select, el("option", { value: "" }, "no instance — place a model first"));
    return;
  }
  replace(
    select,
    wanted.map(([model, status]) => el("option", { value: model }, status === "ready" ? model : `${model} (${status})`)),
  );
  if (chosen && byModel.has(chosen)) select.value = chosen;
}

function bubble(role, text) {
  return el("div", { class: `bubble ${role}` }, el("span", { class: "who" }, role === "user" ? "you" : "model"), el("div", { class: "text" }, text));
}

async function sendChat(event) {
  event.preventDefault();
  const model = $("chat-model").value;
  const input = $("chat-input");
  const prompt = input.value.trim();
  const status = $("chat-status");
  if (!model) {
    status.textContent = "place a model first";
    return;
  }
  if (!prompt || page.chat.controller) return;
  const output = $("chat-output");
  if (output.querySelector(".empty")) replace(output);
  output.append(bubble("user", prompt));
  const answer = bubble("assistant", "");
  answer.classList.add("streaming");
  output.append(answer);
  const answerText = answer.querySelector(".text");
  input.value = "";
  const messages = [...page.chat.messages, { role: "user", content: prompt }];
  const controller = new AbortController();
  page.chat.controller = controller;
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  status.textContent = "waiting for the model…";
  let text = "";
  let failure = null;
  let finish = null;
  let usage = null;
  const started = performance.now();
  let firstAt = null;
  try {
    const maxTokens = Number.parseInt($("chat-max-tokens").value, 10);
    const temperature = Number.parseFloat($("chat-temperature").value);
    const response = await api("v1/chat/completions", {
      method: "POST",
      signal: controller.signal,
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({
        model,
        messages,
        stream: true,
        max_tokens: Number.isFinite(maxTokens) ? maxTokens : 64,
        temperature: Number.isFinite(temperature) ? temperature : 0,
      }),
    });
    if (!response.ok) {
      failure = await errorText(response);
    } else {
      await readEvents(response, (name, data) => {
        if (data === "[DONE]") return;
        const frame = JSON.parse(data);
        if (frame.error) {
          failure = frame.error.message || JSON.stringify(frame.error);
          return;
        }
        const choice = (frame.choices || [])[0];
        if (!choice) return;
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece && firstAt === null) firstAt = performance.now();
        text += piece;
        answerText.textContent = text;
        finish = choice.finish_reason || finish;
        usage = frame.usage || usage;
        status.textContent = "streaming…";
        output.scrollTop = output.scrollHeight;
      });
    }
  } catch (error) {
    failure = controller.signal.aborted ? "stopped" : `request failed: ${error.message}`;
  } finally {
    page.chat.controller = null;
    answer.classList.remove("streaming");
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
  if (failure) {
    answer.append(el("div", { class: "error chat-error" }, failure));
    status.textContent = "";
  } else {
    page.chat.messages = [...messages, { role: "assistant", content: text }];
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    const rate = tokens && firstAt !== null && tokens > 1
      ? `, ${((tokens - 1) / ((performance.now() - firstAt) / 1000)).toFixed(1)} tok/s`
      : "";
    status.textContent = `done (${finish || "?"}${tokens !== null ? `, ${tokens} tokens` : ""}, ${seconds.toFixed(1)} s${rate})`;
    answer.dataset.done = "true";
  }
}

function stopChat() {
  if (page.chat.controller) page.chat.controller.abort();
}

function clearChat() {
  stopChat();
  page.chat.messages = [];
  replace($("chat-output"), el("p", { class: "empty" }, "Ask the placed model something."));
  $("chat-status").textContent = "";
}

// ---------------------------------------------------------------- start

function useKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("key-form").hidden = true;
  if (page.retryNow) page.retryNow();
  loadModels();
}

document.addEventListener("DOMContentLoaded", () => {
  $("place-form").addEventListener("submit", place);
  $("place-preview").addEventListener("click", preview);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-stop").addEventListener("click", stopChat);
  $("chat-clear").addEventListener("click", clearChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("key-form").addEventListener("submit", useKey);
  setInterval(() => {
    if (!page.view || !page.connected) return;
    recordHistory(page.view);
    renderNodes(page.view);
  }, SAMPLE_MS);
  loadModels();
  followState();
});
