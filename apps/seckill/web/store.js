// The storefront: items with live stock and a countdown, buying, my orders, paying.
// Plain browser JavaScript against the sale's HTTP API (docs/seckill.md), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let items = [];
let serverOffsetMs = 0; // server clock minus ours, from the Date header

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

function user() {
  return $("user").value.trim();
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (user()) headers["X-User-Id"] = user();
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const date = Date.parse(resp.headers.get("Date") || "");
  if (!Number.isNaN(date)) serverOffsetMs = date - Date.now();
  let data = null;
  try {
    data = await resp.json();
  } catch (_) {
    data = { error: "unreadable answer" };
  }
  return { status: resp.status, data };
}

function say(text, kind) {
  const m = $("message");
  m.textContent = text;
  m.className = kind || "";
}

function countdown(startsAt) {
  const left = Math.max(0, Date.parse(startsAt) - (Date.now() + serverOffsetMs));
  const s = Math.ceil(left / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + r + "s";
}

function renderItems() {
  const list = $("items");
  list.replaceChildren();
  for (const item of items) {
    const li = document.createElement("li");
    li.className = "card " + item.status;
    li.dataset.item = item.item_id;
    const name = document.createElement("h3");
    name.textContent = item.name;
    const price = document.createElement("p");
    price.textContent = (item.price_cents / 100).toFixed(2);
    price.className = "price";
    const stock = document.createElement("p");
    stock.className = "stock";
    stock.textContent = item.stock_left + " left";
    const state = document.createElement("p");
    state.className = "state";
    state.textContent =
      item.status === "upcoming" ? "opens in " + countdown(item.starts_at)
      : item.status === "sold_out" ? "sold out" : "on sale";
    const buy = document.createElement("button");
    buy.className = "buy";
    buy.textContent = "Buy";
    buy.disabled = item.status !== "on_sale";
    buy.addEventListener("click", () => purchase(item.item_id, buy));
    li.append(name, price, stock, state, buy);
    list.append(li);
  }
}

async function loadItems() {
  const r = await api("GET", "/api/items");
  if (r.status === 200) {
    items = r.data;
    renderItems();
  }
}

async function purchase(itemId, button) {
  if (!user()) {
    say("Enter a user name first.", "error");
    return;
  }
  button.disabled = true;
  const r = await api("POST", "/api/items/" + encodeURIComponent(itemId) + "/buy", {
    user_id: user(),
    request_id: newId(),
  });
  if (r.status === 200) {
    say("Bought: order " + r.data.order_id + ". Pay within the payment window.", "ok");
  } else {
    say(explain(r), "error");
  }
  await Promise.all([loadItems(), loadOrders()]);
}

function explain(r) {
  const e = (r.data && r.data.error) || "error " + r.status;
  const words = {
    sold_out: "Sold out.",
    limit_reached: "You hold the most you may buy of this item.",
    not_started: "The sale has not started yet.",
    rate_limited: "Too many attempts; wait a moment.",
    overloaded: "Busy; try again.",
    expired: "The payment window has closed.",
    forbidden: "That order is not yours.",
  };
  return words[e] || e + (r.data && r.data.detail ? ": " + r.data.detail : "");
}

async function loadOrders() {
  const body = $("orders");
  if (!user()) {
    body.replaceChildren();
    return;
  }
  const r = await api("GET", "/api/users/" + encodeURIComponent(user()) + "/orders");
  if (r.status !== 200) return;
  body.replaceChildren();
  for (const order of r.data) {
    const tr = document.createElement("tr");
    tr.dataset.order = order.order_id;
    const item = items.find((i) => i.item_id === order.item_id);
    for (const text of [order.order_id, item ? item.name : order.item_id, order.status]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    tr.children[2].className = "status";
    const cell = document.createElement("td");
    if (order.status === "pending_payment") {
      const pay = document.createElement("button");
      pay.className = "pay";
      pay.textContent = "Pay";
      pay.addEventListener("click", async () => {
        pay.disabled = true;
        const p = await api("POST", "/api/orders/" + encodeURIComponent(order.order_id) + "/pay", {
          user_id: user(),
        });
        say(p.status === 200 ? "Paid " + order.order_id + "." : explain(p), p.status === 200 ? "ok" : "error");
        await loadOrders();
      });
      cell.append(pay);
    }
    tr.append(cell);
    body.append(tr);
  }
}

$("user").value = localStorage.getItem("keel-user") || "guest-" + Math.random().toString(36).slice(2, 8);
$("user").addEventListener("change", () => {
  localStorage.setItem("keel-user", user());
  loadOrders();
});
localStorage.setItem("keel-user", user());
loadItems().then(loadOrders);
setInterval(loadItems, 1000);
setInterval(loadOrders, 3000);
setInterval(() => items.some((i) => i.status === "upcoming") && renderItems(), 250);
