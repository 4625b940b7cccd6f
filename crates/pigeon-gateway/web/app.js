// Pigeon's browser client: one ES module, no build step. It speaks the protocol of
// docs/protocol.md over one WebSocket (authenticated by a `hello` frame) and the HTTP
// account endpoints. All text from the network goes into the page as text nodes only.

const TOKEN_KEY = 'pigeon.token';
const $ = (id) => document.getElementById(id);

const state = {
  token: localStorage.getItem(TOKEN_KEY),
  me: null, // {user_id, username}
  ws: null,
  connected: false,
  nextId: 1,
  waiting: new Map(), // request id -> {resolve, reject}
  threads: new Map(), // thread_id -> summary (from `threads`)
  messages: new Map(), // thread_id -> Map(seq -> message)
  outbox: [], // sends not yet acknowledged: {client_msg_id, thread_id, to, body, failed}
  current: null, // open thread_id
  more: new Map(), // thread_id -> older history exists
  typing: new Map(), // thread_id -> Map(user_id -> expiry timer)
  lastTypingSent: 0,
  backoff: 500,
  totalUnread: 0,
  names: new Map(), // user_id -> username, for senders in groups
  online: new Map(), // user_id -> online, for the dots of direct chats
  receipts: new Map(), // thread_id -> Map(user_id -> {read, delivered}) of the other members, seen live
  unreadFrom: null, // the open thread's read marker when it was opened, for the divider
  newBelow: 0, // messages that arrived below the view while scrolled up
  showArchived: false,
  floors: new Map(), // thread_id -> seqs up to here that history does not return are hidden from me
};

// ---- HTTP account endpoints -------------------------------------------------------

async function api(path, body, token) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(path, { method: 'POST', headers, body: JSON.stringify(body ?? {}) });
  const text = await response.text();
  const json = text ? JSON.parse(text) : {};
  if (!response.ok) throw new Error(json.message || `HTTP ${response.status}`);
  return json;
}

async function apiGet(path) {
  const response = await fetch(path, { headers: { authorization: `Bearer ${state.token}` } });
  const json = await response.json();
  if (!response.ok) throw new Error(json.message || `HTTP ${response.status}`);
  return json;
}

async function login(register) {
  const username = $('username').value.trim();
  const password = $('password').value;
  $('login-error').textContent = '';
  try {
    if (register) await api('/v1/register', { username, password });
    const session = await api('/v1/login', { username, password, device_name: browserName() });
    state.token = session.token;
    localStorage.setItem(TOKEN_KEY, session.token);
    start();
  } catch (error) {
    $('login-error').textContent = error.message;
  }
}

function browserName() {
  const ua = navigator.userAgent;
  const name = /Firefox\//.test(ua) ? 'Firefox' : /Edg\//.test(ua) ? 'Edge' : /Chrome\//.test(ua) ? 'Chrome' : /Safari\//.test(ua) ? 'Safari' : 'Browser';
  return `${name} (web)`;
}

async function logout() {
  try { await api('/v1/logout', {}, state.token); } catch { /* the token is dropped either way */ }
  localStorage.removeItem(TOKEN_KEY);
  if (state.me) localStorage.removeItem(outboxKey());
  location.reload();
}

// ---- The socket -------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${scheme}://${location.host}/ws`);
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ type: 'hello', id: 0, token: state.token }));
  ws.onmessage = (event) => onFrame(JSON.parse(event.data));
  ws.onclose = (event) => {
    state.connected = false;
    for (const { reject } of state.waiting.values()) reject(new Error('disconnected'));
    state.waiting.clear();
    if (event.code === 4001) { // the token was refused or revoked
      localStorage.removeItem(TOKEN_KEY);
      location.reload();
      return;
    }
    $('banner').hidden = false;
    setTimeout(connect, state.backoff * (0.5 + Math.random() / 2));
    state.backoff = Math.min(state.backoff * 2, 10000);
  };
}

function request(frame) {
  return new Promise((resolve, reject) => {
    if (!state.connected) { reject(new Error('disconnected')); return; }
    const id = state.nextId++;
    state.waiting.set(id, { resolve, reject });
    state.ws.send(JSON.stringify({ ...frame, id }));
  });
}

function onFrame(frame) {
  if (frame.type === 'welcome') return onWelcome(frame);
  if (frame.id !== undefined && frame.id !== null && state.waiting.has(frame.id)) {
    const { resolve, reject } = state.waiting.get(frame.id);
    state.waiting.delete(frame.id);
    if (frame.type === 'error') reject(Object.assign(new Error(frame.message), { code: frame.code }));
    else resolve(frame);
    return;
  }
  switch (frame.type) {
    case 'message': return onMessage(frame);
    case 'receipt': return onReceipt(frame);
    case 'typing': return onTyping(frame);
    case 'presence': return onPresence(frame);
    case 'user_event': return refreshThreads();
    default: return undefined;
  }
}

async function onWelcome(frame) {
  state.connected = true;
  state.backoff = 500;
  state.me = { user_id: frame.user_id, username: frame.username };
  restoreOutbox();
  $('banner').hidden = true;
  $('me-name').textContent = frame.username;
  // Events missed while disconnected would leave holes in the threads not open: they
  // load afresh when next opened. The open one catches up now.
  for (const threadId of [...state.messages.keys()]) {
    if (threadId !== state.current) forget(threadId);
  }
  const current = state.current;
  await refreshThreads();
  if (current && state.more.has(current)) await catchUp(current).catch(() => {});
  else if (current) await loadOlder(current).then(() => renderMessages(true)).catch(() => {});
  // Sends queued while offline go out once, in order, with their original ids.
  for (const pending of [...state.outbox]) if (!pending.failed) await transmit(pending);
}

// ---- Conversations ----------------------------------------------------------------

async function refreshThreads() {
  let answer;
  try { answer = await request({ type: 'threads' }); } catch { return; }
  state.threads = new Map(answer.threads.map((t) => [t.thread_id, t]));
  state.totalUnread = answer.total_unread;
  for (const summary of state.threads.values()) {
    if (summary.peer) state.names.set(summary.peer.user_id, summary.peer.username);
    applyReceipts(summary);
  }
  renderThreads();
  if (state.current) renderMessages();
  // Presence of the people in direct chats; changes then arrive as events.
  for (const summary of state.threads.values()) {
    if (summary.kind !== 'direct' || !summary.peer || state.online.has(summary.peer.user_id)) continue;
    request({ type: 'presence', user: summary.peer.user_id })
      .then(onPresence)
      .catch(() => {});
  }
}

function threadName(summary) {
  if (summary.nickname) return summary.nickname;
  if (summary.kind === 'direct') return summary.peer ? summary.peer.username : 'direct chat';
  return summary.group ? summary.group.title : 'group';
}

function renderThreads() {
  const list = $('threads');
  list.replaceChildren();
  // Pinned first, then most recent; archived ones last, under their own heading.
  const threads = [...state.threads.values()].sort((a, b) =>
    (a.archived - b.archived) || (b.pinned - a.pinned) || (b.updated_at - a.updated_at));
  const archived = threads.filter((t) => t.archived);
  let archivedShown = false;
  for (const summary of threads) {
    if (summary.archived && !archivedShown) {
      archivedShown = true;
      // Archived chats stay folded away under one row until asked for.
      const heading = document.createElement('li');
      heading.className = 'heading';
      const toggle = document.createElement('button');
      toggle.type = 'button';
      toggle.id = 'toggle-archived';
      toggle.className = 'link';
      toggle.setAttribute('aria-expanded', String(state.showArchived));
      const unread = archived.reduce((sum, t) => sum + (t.unread > 0 ? 1 : 0), 0);
      toggle.textContent = `${state.showArchived ? '▾' : '▸'} Archived (${archived.length})${unread ? ` · ${unread} unread` : ''}`;
      toggle.addEventListener('click', () => { state.showArchived = !state.showArchived; renderThreads(); });
      heading.append(toggle);
      list.append(heading);
    }
    if (summary.archived && !state.showArchived && summary.thread_id !== state.current) continue;
    const item = document.createElement('li');
    item.dataset.thread = summary.thread_id;
    if (summary.thread_id === state.current) item.classList.add('active');
    const name = document.createElement('span');
    name.className = 'name';
    if (summary.kind === 'direct') {
      const dot = document.createElement('span');
      dot.className = 'dot';
      dot.dataset.user = summary.peer?.user_id ?? '';
      if (state.online.get(summary.peer?.user_id)) dot.classList.add('online');
      name.append(dot);
    }
    name.append(threadName(summary) + (summary.pinned ? ' · pinned' : '') + (summary.muted ? ' · muted' : ''));
    const badge = document.createElement('span');
    badge.className = 'badge';
    badge.textContent = summary.unread > 0 && summary.thread_id !== state.current ? String(summary.unread) : '';
    const preview = document.createElement('span');
    preview.className = 'preview';
    preview.textContent = previewOf(summary.last_message);
    item.append(name, badge, preview);
    item.addEventListener('click', () => openThread(summary.thread_id));
    list.append(item);
  }
  document.title = state.totalUnread > 0 ? `(${state.totalUnread}) Pigeon` : 'Pigeon';
}

/// Most older pages loaded on opening a thread to reach its first unread message.
const UNREAD_PAGES = 10;

/// One line for the conversation list: the text, or what a group change did; "You: "
/// before my own.
function previewOf(message) {
  if (!message) return '';
  if (message.kind === 'system') return describeSystem(message);
  return message.sender_id === state.me?.user_id ? `You: ${message.body}` : message.body;
}

async function openThread(threadId) {
  state.current = threadId;
  state.newBelow = 0;
  $('app').classList.add('in-chat');
  $('composer').hidden = false;
  const summary = state.threads.get(threadId);
  // Where the unread messages begin, as the list said before this visit marks them.
  state.unreadFrom = summary && summary.unread > 0 ? (summary.read_seq ?? 0) : null;
  $('chat-title').textContent = summary ? threadName(summary) : '';
  $('open-details').hidden = !summary;
  renderThreads();
  if (summary?.kind === 'group') loadMembers(threadId);
  try {
    // The first visit loads the newest page (events that arrived before it are in that
    // history too); later visits fetch what came after the newest held.
    if (!state.more.has(threadId)) {
      state.messages.delete(threadId);
      await loadOlder(threadId);
    } else {
      await catchUp(threadId);
    }
    // Back to the first unread message, so the divider has something above it.
    const unreadFrom = state.unreadFrom;
    for (let page = 0; unreadFrom !== null && page < UNREAD_PAGES; page += 1) {
      const oldest = Math.min(...held(threadId).keys());
      if (state.current !== threadId || oldest <= unreadFrom + 1 || !state.more.get(threadId)) break;
      await loadOlder(threadId);
    }
  } catch {
    // Disconnected: the reconnect catches the open thread up.
  }
  if (state.current !== threadId) return;
  renderMessages(true);
  // Open at the first unread message; the newest may be further down.
  $('unread-divider')?.scrollIntoView({ block: 'start' });
  renderJump();
  markRead();
  $('body').focus();
}

function startChat(username) {
  $('new-chat-error').textContent = '';
  const existing = [...state.threads.values()].find((t) => t.kind === 'direct' && t.peer?.username === username);
  if (existing) { openThread(existing.thread_id); return; }
  // The direct thread is made by the first message; a wrong name is refused then.
  state.current = null;
  state.pendingPeer = { username };
  $('chat-title').textContent = username;
  $('messages').replaceChildren();
  $('composer').hidden = false;
  $('app').classList.add('in-chat');
  renderThreads();
  $('body').focus();
}

async function createGroup(title, members) {
  $('new-chat-error').textContent = '';
  try {
    const answer = await request({ type: 'create_group', title, members });
    await refreshThreads();
    await openThread(answer.group.thread_id);
  } catch (error) {
    $('new-chat-error').textContent = error.message;
  }
}

/// Learns a group's members: their usernames, to name the senders, and their read and
/// delivered markers (groups small enough for receipts carry them), so a message shows
/// "read" after a reload too, not only once receipts arrive live.
async function loadMembers(threadId) {
  let after;
  const marks = new Map();
  for (let page = 0; page < 10; page += 1) {
    let answer;
    try {
      answer = await request({ type: 'group_members', thread_id: threadId, after, limit: 200 });
    } catch { return; }
    for (const member of answer.members) {
      state.names.set(member.user_id, member.username);
      if (member.user_id !== state.me.user_id && member.read_seq !== undefined) {
        marks.set(member.user_id, { read: member.read_seq, delivered: member.delivered_seq });
      }
    }
    if (!answer.more || answer.members.length === 0) break;
    after = answer.members[answer.members.length - 1].user_id;
  }
  // Receipts that arrived meanwhile may be newer than the list; members who left drop out.
  for (const [user, live] of state.receipts.get(threadId) ?? []) {
    const listed = marks.get(user);
    if (!listed) continue;
    listed.read = Math.max(listed.read, live.read);
    listed.delivered = Math.max(listed.delivered, live.delivered);
  }
  if (marks.size > 0) state.receipts.set(threadId, marks);
  if (threadId === state.current) renderMessages();
}

// ---- Messages ---------------------------------------------------------------------

function held(threadId) {
  if (!state.messages.has(threadId)) state.messages.set(threadId, new Map());
  return state.messages.get(threadId);
}

function store(message) {
  held(message.thread_id).set(message.seq, message);
}

async function loadOlder(threadId) {
  const messages = held(threadId);
  const oldest = messages.size ? Math.min(...messages.keys()) : undefined;
  const page = await request({ type: 'history', thread_id: threadId, before: oldest, limit: 50 });
  page.messages.forEach(store);
  state.more.set(threadId, page.more);
}

/// Fetches what arrived in a thread while this page was not listening.
/// The newest seq held with every seq from the oldest held up to it also held: seqs have
/// no gaps, so a hole means events were missed (a dropped socket), and catching up must
/// start below it, not after the newest message that happened to arrive.
function contiguousNewest(threadId) {
  // Seqs up to the floor that the server did not return are hidden from me (I was out
  // of the group then): not a hole.
  const floor = state.floors.get(threadId) ?? 0;
  const seqs = [...held(threadId).keys()].sort((a, b) => a - b);
  let newest = seqs.length ? seqs[0] : 0;
  for (const seq of seqs) {
    if (seq > newest + 1 && seq - 1 > floor) break;
    newest = seq;
  }
  return newest;
}

async function catchUp(threadId) {
  let after = contiguousNewest(threadId);
  for (;;) {
    const page = await request({ type: 'history', thread_id: threadId, after, limit: 200 });
    const first = page.messages[0]?.seq;
    if (first > after + 1) state.floors.set(threadId, Math.max(state.floors.get(threadId) ?? 0, first - 1));
    page.messages.forEach(store);
    if (!page.more || page.messages.length === 0) break;
    after = page.messages[page.messages.length - 1].seq;
  }
  if (threadId === state.current) renderMessages();
}

/// Tells the sender a message reached this device (received, not yet seen).
function markDelivered(message) {
  request({ type: 'mark', thread_id: message.thread_id, seq: message.seq, kind: 'delivered' }).catch(() => {});
}

/// Drops what is held of a thread: it loads afresh when next opened.
function forget(threadId) {
  state.messages.delete(threadId);
  state.more.delete(threadId);
  state.floors.delete(threadId);
}

function onMessage(message) {
  store(message);
  const summary = state.threads.get(message.thread_id);
  // A new conversation, or a group change (title, members): the list is read again.
  if (!summary || message.kind === 'system') { refreshThreads(); }
  if (!summary) {
    // Received, not yet seen: the sender learns it was delivered.
    if (message.sender_id !== state.me.user_id) {
      markDelivered(message);
    }
    return;
  }
  summary.last_message = message;
  summary.last_seq = Math.max(summary.last_seq, message.seq);
  summary.updated_at = message.created_at;
  if (message.kind === 'system' && summary.kind === 'group' && message.thread_id === state.current) {
    loadMembers(message.thread_id);
  }
  const open = message.thread_id === state.current;
  const below = open && !atBottom();
  if (open) {
    renderMessages();
    // A hole below it: events were missed; fetch them.
    if (contiguousNewest(message.thread_id) < message.seq) catchUp(message.thread_id).catch(() => {});
  }
  if (message.sender_id === state.me.user_id) {
    // From another device of mine: the server moved my read marker with it.
    advanceRead(summary, message.seq);
  } else if (open && !below && document.visibilityState === 'visible') {
    markRead();
  } else {
    // Not seen yet (another chat, scrolled up, or the tab in the background).
    if (below) state.newBelow += 1;
    summary.unread += 1;
    if (!summary.muted) state.totalUnread += 1;
    markDelivered(message);
    if (open) renderJump();
  }
  renderThreads();
}

/// Kept even when the thread is not listed yet: a receipt can overtake the answer that
/// lists a new chat (the peer's page marks the message delivered before the sender's
/// `threads` answer comes back), and a `threads` answer computed before a receipt must not
/// take it back. `applyReceipts` folds them into the summary whenever it is (re)loaded.
function onReceipt(receipt) {
  const members = state.receipts.get(receipt.thread_id) ?? new Map();
  state.receipts.set(receipt.thread_id, members);
  const marks = members.get(receipt.user_id) ?? { read: 0, delivered: 0 };
  if (receipt.kind === 'read') marks.read = Math.max(marks.read, receipt.seq);
  marks.delivered = Math.max(marks.delivered, receipt.seq);
  members.set(receipt.user_id, marks);
  const summary = state.threads.get(receipt.thread_id);
  if (!summary) return;
  applyReceipts(summary);
  if (receipt.thread_id === state.current) renderMessages();
}

/// Moves a direct chat's peer markers up to the receipts seen live.
function applyReceipts(summary) {
  if (summary.kind !== 'direct') return;
  for (const marks of state.receipts.get(summary.thread_id)?.values() ?? []) {
    summary.peer_read_seq = Math.max(summary.peer_read_seq ?? 0, marks.read);
    summary.peer_delivered_seq = Math.max(summary.peer_delivered_seq ?? 0, marks.delivered);
  }
}

function onPresence(presence) {
  state.online.set(presence.user_id, presence.online);
  for (const dot of document.querySelectorAll('.dot')) {
    if (dot.dataset.user === presence.user_id) dot.classList.toggle('online', presence.online);
  }
}

function onTyping(event) {
  const timers = state.typing.get(event.thread_id) ?? new Map();
  state.typing.set(event.thread_id, timers);
  clearTimeout(timers.get(event.user_id));
  if (event.active) {
    timers.set(event.user_id, setTimeout(() => { timers.delete(event.user_id); renderTyping(); }, event.expires_ms ?? 6000));
  } else {
    timers.delete(event.user_id);
  }
  renderTyping();
}

function renderTyping() {
  const timers = state.typing.get(state.current);
  const line = $('typing');
  if (!timers || timers.size === 0) { line.hidden = true; return; }
  const summary = state.threads.get(state.current);
  line.textContent = summary?.kind === 'direct' ? `${threadName(summary)} is typing…` : 'Someone is typing…';
  line.hidden = false;
}

/// Whether the newest message is in view (within a few pixels).
function atBottom() {
  const list = $('messages');
  return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
}

/// The newest message whose top is in view: what the reader has actually seen.
function newestSeen() {
  const list = $('messages');
  const bottom = list.getBoundingClientRect().bottom;
  let newest = 0;
  for (const item of list.querySelectorAll('li[data-seq]')) {
    if (item.getBoundingClientRect().top < bottom) newest = Math.max(newest, Number(item.dataset.seq));
  }
  return newest;
}

/// Moves a thread's read marker (locally) and recounts its unread messages and the total.
/// Returns whether it moved.
function advanceRead(summary, seq) {
  if (seq <= (summary.read_seq ?? 0)) return false;
  summary.last_seq = Math.max(summary.last_seq ?? 0, seq);
  const unread = Math.max(0, summary.last_seq - seq);
  if (!summary.muted) state.totalUnread = Math.max(0, state.totalUnread - (summary.unread - unread));
  summary.read_seq = seq;
  summary.unread = unread;
  return true;
}

/// Moves the read marker up to the newest message in view, when the page is visible.
async function markRead() {
  const summary = state.threads.get(state.current);
  if (!summary || document.visibilityState !== 'visible') return;
  const seen = newestSeen();
  if (advanceRead(summary, seen)) {
    renderThreads();
    await request({ type: 'mark', thread_id: state.current, seq: seen, kind: 'read' }).catch(() => {});
  }
}

/// The "newest" button: shown while the newest messages are out of view.
function renderJump() {
  const jump = $('jump');
  const hidden = !state.current || atBottom();
  if (hidden) state.newBelow = 0;
  jump.hidden = hidden;
  jump.textContent = state.newBelow > 0 ? `↓ ${state.newBelow} new` : '↓ Newest';
}

function statusOf(message, summary) {
  if (summary?.kind === 'group') {
    // Read (delivered) once every other member's receipt says so; groups over 256
    // members send no receipts, so their messages stay "sent".
    const others = (summary.group?.member_count ?? 1) - 1;
    const marks = [...(state.receipts.get(summary.thread_id)?.values() ?? [])];
    if (others > 0 && marks.filter((m) => m.read >= message.seq).length >= others) return 'read';
    if (others > 0 && marks.filter((m) => m.delivered >= message.seq).length >= others) return 'delivered';
    return 'sent';
  }
  if (summary?.kind !== 'direct') return 'sent';
  if ((summary.peer_read_seq ?? 0) >= message.seq) return 'read';
  if ((summary.peer_delivered_seq ?? 0) >= message.seq) return 'delivered';
  return 'sent';
}

function dayOf(ms) {
  return new Date(ms).toLocaleDateString(undefined, { weekday: 'short', year: 'numeric', month: 'short', day: 'numeric' });
}

function renderMessages(scrollToEnd = false) {
  const list = $('messages');
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.replaceChildren();
  const summary = state.threads.get(state.current);
  const messages = [...held(state.current).values()].sort((a, b) => a.seq - b.seq);
  let day = null;
  const unread = state.unreadFrom === null ? []
    : messages.filter((m) => m.seq > state.unreadFrom && m.sender_id !== state.me.user_id);
  for (const message of messages) {
    const thisDay = dayOf(message.created_at);
    if (thisDay !== day) {
      day = thisDay;
      const separator = document.createElement('li');
      separator.className = 'day';
      separator.textContent = thisDay;
      list.append(separator);
    }
    if (message === unread[0]) {
      const divider = document.createElement('li');
      divider.id = 'unread-divider';
      divider.className = 'unread-divider';
      divider.textContent = unread.length === 1 ? '1 unread message' : `${unread.length} unread messages`;
      list.append(divider);
    }
    const mine = message.sender_id === state.me.user_id;
    const item = messageItem(message.kind === 'system' ? describeSystem(message) : message.body, {
      mine,
      system: message.kind === 'system',
      status: mine && message.kind !== 'system' ? statusOf(message, summary) : null,
      time: message.created_at,
      sender: summary?.kind === 'group' && !mine && message.kind !== 'system'
        ? (state.names.get(message.sender_id) ?? 'someone') : null,
    });
    item.dataset.seq = String(message.seq);
    list.append(item);
  }
  for (const pending of state.outbox) {
    if (pending.thread_id !== state.current && !(pending.to && state.pendingPeer?.username === pending.to && !state.current)) continue;
    const item = messageItem(pending.body, { mine: true, status: pending.failed ? 'failed' : 'pending' });
    if (pending.failed) {
      const retry = document.createElement('button');
      retry.className = 'small secondary retry';
      retry.textContent = 'Retry';
      retry.addEventListener('click', () => { pending.failed = false; outboxPut(pending); renderMessages(); transmit(pending); });
      item.append(retry);
    }
    list.append(item);
  }
  renderTyping();
  if (scrollToEnd || nearBottom) list.scrollTop = list.scrollHeight;
  renderJump();
}

function messageItem(text, { mine, system, status, time, sender }) {
  const item = document.createElement('li');
  if (mine) item.classList.add('mine');
  if (system) item.classList.add('system');
  if (sender) {
    const name = document.createElement('span');
    name.className = 'sender';
    name.textContent = sender;
    item.append(name);
  }
  item.append(document.createTextNode(text));
  const meta = document.createElement('span');
  meta.className = 'meta';
  const clock = time ? new Date(time).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' }) : '';
  meta.textContent = [clock, status].filter(Boolean).join(' · ');
  if (status) {
    meta.dataset.status = status;
    if (status === 'failed') meta.classList.add('failed');
  }
  item.append(meta);
  return item;
}

function describeSystem(message) {
  const event = message.system ?? {};
  const who = state.names.get(message.sender_id) ?? 'someone';
  switch (event.event) {
    case 'created': return `${who} created the group “${event.title ?? ''}”`;
    case 'members_added': return `${who} added members`;
    case 'member_removed': return `${who} removed a member`;
    case 'member_left': return `${who} left`;
    case 'updated': return `${who} changed the group`;
    default: return `${who}: ${event.event ?? 'group change'}`;
  }
}

// ---- Sending ----------------------------------------------------------------------

// The outbox is kept in localStorage, per user, so a send that is pending (or failed)
// when the tab is closed or reloaded goes out (or can be retried) next time, with its
// original client_msg_id: the server's dedupe makes that safe. Entries are added and
// removed one at a time, so two tabs of one user do not overwrite each other's.
const outboxKey = () => `pigeon.outbox.${state.me.user_id}`;
let outboxRestored = false;

function storedOutbox() {
  try {
    const list = JSON.parse(localStorage.getItem(outboxKey()) ?? '[]');
    return Array.isArray(list) ? list.filter((p) => p && typeof p.client_msg_id === 'string' && typeof p.body === 'string') : [];
  } catch {
    return []; // unreadable: nothing kept
  }
}

function writeOutbox(list) {
  if (list.length === 0) localStorage.removeItem(outboxKey());
  else localStorage.setItem(outboxKey(), JSON.stringify(list));
}

/// Stores (or updates) one pending send.
function outboxPut(pending) {
  if (!state.me) return;
  const list = storedOutbox().filter((p) => p.client_msg_id !== pending.client_msg_id);
  const { client_msg_id, thread_id, to, body, failed } = pending;
  list.push({ client_msg_id, thread_id, to, body, failed });
  writeOutbox(list);
}

/// Forgets one send: acknowledged, or impossible.
function outboxDrop(clientMsgId) {
  if (!state.me) return;
  writeOutbox(storedOutbox().filter((p) => p.client_msg_id !== clientMsgId));
}

function restoreOutbox() {
  if (outboxRestored) return;
  outboxRestored = true;
  const held = new Set(state.outbox.map((p) => p.client_msg_id));
  for (const pending of storedOutbox()) {
    // A failed first message to a new chat has nowhere to be shown: dropped.
    if (pending.failed && !pending.thread_id) { outboxDrop(pending.client_msg_id); continue; }
    if (held.has(pending.client_msg_id)) continue;
    state.outbox.push({ client_msg_id: pending.client_msg_id, thread_id: pending.thread_id, to: pending.to, body: pending.body, failed: Boolean(pending.failed) });
  }
  for (const pending of state.outbox) outboxPut(pending);
}

function send(body) {
  const pending = { client_msg_id: uuidv7(), body, failed: false };
  if (state.current) pending.thread_id = state.current;
  else if (state.pendingPeer) pending.to = state.pendingPeer.username;
  else return;
  state.outbox.push(pending);
  outboxPut(pending);
  renderMessages(true);
  transmit(pending);
}

// A time-ordered client id (UUIDv7), as the SDK makes them: the server's dedupe index
// appends such ids instead of scattering them. crypto.randomUUID would also be unique,
// but it is random, and browsers offer it only on HTTPS and localhost pages.
function uuidv7() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  let ms = Date.now();
  for (let i = 5; i >= 0; i -= 1) {
    bytes[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  bytes[6] = (bytes[6] & 0x0f) | 0x70;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

async function transmit(pending) {
  const frame = { type: 'send', client_msg_id: pending.client_msg_id, body: pending.body };
  if (pending.thread_id) frame.thread_id = pending.thread_id; else frame.to = pending.to;
  let sent;
  try {
    sent = await request(frame);
  } catch (error) {
    // Offline or a retryable refusal: it stays queued and goes out after reconnecting.
    if (error.message !== 'disconnected' && error.code !== 'unavailable' && error.code !== 'rate_limited') {
      pending.failed = true;
      if (error.code === 'unknown_user') {
        state.outbox = state.outbox.filter((p) => p !== pending);
        outboxDrop(pending.client_msg_id);
        $('new-chat-error').textContent = `There is no user ${pending.to}`;
      } else {
        outboxPut(pending);
      }
      renderMessages();
    }
    return;
  }
  state.outbox = state.outbox.filter((p) => p !== pending);
  outboxDrop(pending.client_msg_id);
  store({
    thread_id: sent.thread_id, seq: sent.seq, message_id: sent.message_id, sender_id: state.me.user_id,
    client_msg_id: sent.client_msg_id, kind: 'text', body: pending.body, created_at: sent.server_time,
  });
  if (!state.threads.has(sent.thread_id)) {
    await refreshThreads();
    state.pendingPeer = null;
    if (!state.current || state.current === sent.thread_id) await openThread(sent.thread_id);
    return;
  }
  const summary = state.threads.get(sent.thread_id);
  summary.last_message = { body: pending.body, kind: 'text', sender_id: state.me.user_id };
  summary.updated_at = sent.server_time;
  // Sending moved my read marker to it (the server does so with no event).
  advanceRead(summary, sent.seq);
  renderThreads();
  if (sent.thread_id === state.current) renderMessages(true);
}

// ---- Dialogs: a conversation's details, people and devices -----------------------

function button(label, onClick) {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = 'small secondary';
  b.textContent = label;
  b.addEventListener('click', onClick);
  return b;
}

function row(text, ...buttons) {
  const item = document.createElement('li');
  const label = document.createElement('span');
  label.textContent = text;
  const actions = document.createElement('span');
  actions.append(...buttons);
  item.append(label, actions);
  return item;
}

/// Runs a request from a dialog, showing its error there; refreshes what it changed.
async function act(errorId, frame, after) {
  $(errorId).textContent = '';
  try {
    await request(frame);
    await after?.();
  } catch (error) {
    $(errorId).textContent = error.message;
  }
}

async function renderDetails() {
  const summary = state.threads.get(state.current);
  if (!summary) return;
  $('details-title').textContent = threadName(summary);
  const setting = (key, on, off) => {
    const b = $(`toggle-${key === 'muted' ? 'mute' : key === 'pinned' ? 'pin' : 'archive'}`);
    b.textContent = summary[key] ? off : on;
    b.onclick = () => act('details-error',
      { type: 'thread_settings', thread_id: summary.thread_id, [key]: !summary[key] },
      async () => { await refreshThreads(); renderDetails(); });
  };
  setting('muted', 'Mute', 'Unmute');
  setting('pinned', 'Pin', 'Unpin');
  setting('archived', 'Archive', 'Unarchive');
  $('nickname-value').value = summary.nickname ?? '';
  const group = summary.kind === 'group';
  $('group-controls').hidden = !group;
  if (!group) return;
  const list = $('members');
  list.replaceChildren();
  try {
    const answer = await request({ type: 'group_members', thread_id: summary.thread_id, limit: 200 });
    for (const member of answer.members) {
      state.names.set(member.user_id, member.username);
      const remove = member.user_id === state.me.user_id ? [] : [button('Remove', () => act('details-error',
        { type: 'remove_member', thread_id: summary.thread_id, user: member.user_id }, renderDetails))];
      list.append(row(`${member.username} (${member.role})`, ...remove));
    }
  } catch (error) {
    $('details-error').textContent = error.message;
  }
}

let peopleRenders = 0;

async function renderPeople() {
  $('people-error').textContent = '';
  const contacts = $('contacts');
  const devices = $('devices');
  // Renders overlap (opening the dialog, then an action), and /v1/me goes over HTTP, not
  // in order with the socket's answers: only the latest render may draw.
  const render = ++peopleRenders;
  try {
    const [book, mine, me] = await Promise.all([
      request({ type: 'contacts' }), request({ type: 'devices' }), apiGet('/v1/me')]);
    if (render !== peopleRenders) return;
    $('hide-last-seen').checked = me.hide_last_seen;
    contacts.replaceChildren();
    for (const contact of book.contacts) {
      const act2 = (action) => button(action[0].toUpperCase() + action.slice(1), () => act('people-error',
        { type: 'contact', user: contact.user_id, action }, renderPeople));
      const buttons = [];
      if (contact.state === 'incoming') buttons.push(act2('accept'), act2('decline'));
      if (contact.state === 'requested') buttons.push(act2('cancel'));
      if (contact.state === 'friend') buttons.push(act2('remove'));
      buttons.push(contact.blocked ? act2('unblock') : act2('block'));
      const what = contact.blocked ? 'blocked' : (contact.state ?? '');
      const shown = contact.alias ? `${contact.alias} (${contact.username})` : contact.username;
      const online = contact.state === 'friend' ? (contact.online ? ' · online' : '') : '';
      contacts.append(row(`${shown} — ${what}${online}`, ...buttons));
    }
    devices.replaceChildren();
    for (const device of mine.devices) {
      const revoke = device.current ? [] : [button('Revoke', () => act('people-error',
        { type: 'revoke_device', device_id: device.device_id }, renderPeople))];
      devices.append(row(`${device.name}${device.current ? ' (this one)' : ''}`, ...revoke));
    }
  } catch (error) {
    if (render === peopleRenders) $('people-error').textContent = error.message;
  }
}

function initDialogs() {
  $('open-details').addEventListener('click', () => { $('details').showModal(); renderDetails(); });
  $('open-people').addEventListener('click', () => { $('people').showModal(); renderPeople(); });
  $('rename').addEventListener('submit', (event) => {
    event.preventDefault();
    const title = $('rename-title').value.trim();
    if (!title) return;
    act('details-error', { type: 'update_group', thread_id: state.current, title }, async () => {
      $('rename-title').value = '';
      await refreshThreads();
      $('chat-title').textContent = threadName(state.threads.get(state.current));
      renderDetails();
    });
  });
  $('add-member').addEventListener('submit', (event) => {
    event.preventDefault();
    const user = $('add-member-user').value.trim().toLowerCase();
    if (!user) return;
    act('details-error', { type: 'add_members', thread_id: state.current, members: [user] }, async () => {
      $('add-member-user').value = '';
      renderDetails();
    });
  });
  $('leave').addEventListener('click', () => act('details-error',
    { type: 'leave_group', thread_id: state.current }, async () => {
      $('details').close();
      forget(state.current);
      state.current = null;
      $('composer').hidden = true;
      $('open-details').hidden = true;
      $('messages').replaceChildren();
      $('chat-title').textContent = 'Pick a conversation';
      await refreshThreads();
    }));
  $('nickname').addEventListener('submit', (event) => {
    event.preventDefault();
    const nickname = $('nickname-value').value.trim();
    act('details-error', { type: 'thread_settings', thread_id: state.current, nickname }, async () => {
      await refreshThreads();
      $('chat-title').textContent = threadName(state.threads.get(state.current));
      renderDetails();
    });
  });
  $('hide-last-seen').addEventListener('change', (event) => act('people-error',
    { type: 'set_privacy', hide_last_seen: event.target.checked }, renderPeople));
  $('add-contact').addEventListener('submit', (event) => {
    event.preventDefault();
    const user = $('add-contact-user').value.trim().toLowerCase();
    if (!user) return;
    act('people-error', { type: 'contact', user, action: 'request' }, async () => {
      $('add-contact-user').value = '';
      renderPeople();
    });
  });
}

// ---- Wiring -----------------------------------------------------------------------

function start() {
  $('login').hidden = true;
  $('app').hidden = false;
  connect();
}

function init() {
  initDialogs();
  $('login-form').addEventListener('submit', (event) => { event.preventDefault(); login(false); });
  $('register-button').addEventListener('click', () => {
    if ($('login-form').reportValidity()) login(true);
  });
  $('logout').addEventListener('click', logout);
  $('back').addEventListener('click', () => { $('app').classList.remove('in-chat'); state.current = null; renderThreads(); });
  $('new-chat').addEventListener('submit', (event) => {
    event.preventDefault();
    const username = $('new-chat-user').value.trim().toLowerCase();
    if (username) startChat(username);
    $('new-chat-user').value = '';
  });
  $('new-group').addEventListener('submit', (event) => {
    event.preventDefault();
    const title = $('new-group-title').value.trim();
    const members = $('new-group-members').value.split(',').map((m) => m.trim().toLowerCase()).filter(Boolean);
    if (!title) return;
    createGroup(title, members);
    $('new-group-title').value = '';
    $('new-group-members').value = '';
  });
  const body = $('body');
  body.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey) { event.preventDefault(); $('composer').requestSubmit(); }
  });
  body.addEventListener('input', () => {
    const now = Date.now();
    if (state.current && body.value && now - state.lastTypingSent > 3000) {
      state.lastTypingSent = now;
      request({ type: 'typing', thread_id: state.current, active: true }).catch(() => {});
    }
  });
  $('composer').addEventListener('submit', (event) => {
    event.preventDefault();
    const text = body.value;
    if (!text.trim()) return;
    body.value = '';
    state.lastTypingSent = 0;
    send(text);
  });
  $('jump').addEventListener('click', () => {
    const list = $('messages');
    list.scrollTop = list.scrollHeight;
  });
  $('messages').addEventListener('scroll', async () => {
    const list = $('messages');
    renderJump();
    markRead();
    if (list.scrollTop < 40 && state.current && state.more.get(state.current)) {
      state.more.set(state.current, false);
      const before = list.scrollHeight;
      try {
        await loadOlder(state.current);
      } catch {
        state.more.set(state.current, true); // try again on the next scroll
        return;
      }
      renderMessages();
      list.scrollTop = list.scrollHeight - before;
    }
  });
  document.addEventListener('visibilitychange', () => { renderJump(); markRead(); });
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') { $('new-chat-error').textContent = ''; $('login-error').textContent = ''; }
  });
  if (state.token) start(); else $('login').hidden = false;
}

init();
