// People chat through the browser client in headless Chromium.
// Usage: node chat.mjs <server base URL> [screenshot folder]
// Run by crates/pigeon-cli/tests/it/browser.rs against a real `pigeon serve`. To have
// the server stopped and started, it prints `STOP` or `START` and waits for a line on
// stdin saying it is done.

import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function server(command) {
  console.log(command);
  const answer = await lines.next();
  if (answer.done || answer.value.trim() !== 'ok') throw new Error(`${command}: no ok from the harness`);
}

const base = process.argv[2];
const shots = process.argv[3];
const TIMEOUT = 15000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}

async function person(name) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const problems = [];
  page.on('pageerror', (error) => problems.push(`${name}: ${error.message}`));
  page.on('console', (message) => { if (message.type() === 'error') problems.push(`${name}: ${message.text()}`); });
  await page.goto(base);
  await page.fill('#username', name);
  await page.fill('#password', 'correct horse');
  await page.click('#register-button');
  await page.waitForSelector('#app:not([hidden])');
  await page.waitForFunction(() => document.querySelector('#me-name').textContent.length > 0);
  return { page, problems };
}

// Types `text` into the field and presses Enter (which sends or submits).
async function enter(page, selector, text) {
  await page.fill(selector, text);
  await page.press(selector, 'Enter');
}

async function shot(page, file) {
  if (shots) await page.screenshot({ path: `${shots}/${file}` });
}

try {
  const alice = await person('alice');
  const bob = await person('bob');

  // The page carries a strict Content-Security-Policy.
  const response = await alice.page.request.get(base);
  const csp = response.headers()['content-security-policy'] ?? '';
  check(csp.includes("script-src 'self'") && csp.includes("default-src 'none'"), `CSP header: ${csp}`);

  // Alice starts a chat with bob and writes to him.
  await enter(alice.page, '#new-chat-user', 'bob');
  await enter(alice.page, '#body', 'hello bob');
  await alice.page.waitForSelector('#messages li.mine >> text=hello bob');
  await alice.page.waitForSelector('#messages li.mine .meta[data-status="sent"], #messages li.mine .meta[data-status="delivered"]');

  // Bob's page has it but he has not opened it: delivered, not read.
  await alice.page.waitForSelector('#messages li.mine .meta[data-status="delivered"]');

  // Bob sees the conversation appear with an unread badge, opens it and reads it.
  await bob.page.waitForSelector('#threads li >> text=alice');
  await bob.page.waitForSelector('#threads li .badge:text("1")');
  check(await bob.page.title() === '(1) Pigeon', `unread total in the tab title: ${await bob.page.title()}`);
  await bob.page.waitForSelector('#threads li .dot.online', { timeout: TIMEOUT });
  await bob.page.click('#threads li >> text=alice');
  await bob.page.waitForSelector('#messages li >> text=hello bob');

  // Alice sees her message read.
  await alice.page.waitForSelector('#messages li.mine .meta[data-status="read"]');

  // Bob types: alice sees it.
  await bob.page.fill('#body', 'typing…');
  await bob.page.type('#body', ' x');
  await alice.page.waitForSelector('#typing:not([hidden])');
  await bob.page.fill('#body', '');

  // A message with markup shows as text and runs nothing.
  const hostile = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">';
  await enter(bob.page, '#body', hostile);
  const shown = await alice.page.waitForSelector('#messages li:not(.mine) >> text=<script>');
  const text = await shown.evaluate((node) => node.firstChild.textContent);
  check(text === hostile, `markup shown as text: ${text}`);
  check(await alice.page.evaluate(() => window.pwned === undefined), 'no script ran');
  check(await alice.page.locator('#messages img').count() === 0, 'no element was injected');

  // Shift+Enter is a new line; Enter sends.
  await alice.page.fill('#body', 'line one');
  await alice.page.press('#body', 'Shift+Enter');
  await alice.page.type('#body', 'line two');
  await alice.page.press('#body', 'Enter');
  await alice.page.waitForSelector('#messages li.mine >> text=/line one\\nline two/');
  await shot(alice.page, 'conversation.png');

  // Pinning shows in the list; day separators head the history.
  await alice.page.click('#open-details');
  await alice.page.click('#toggle-pin');
  await alice.page.waitForSelector('#toggle-pin:text("Unpin")');
  await alice.page.keyboard.press('Escape');
  await alice.page.waitForSelector('#threads li >> text=bob · pinned');
  check(await alice.page.locator('#messages li.day').count() >= 1, 'a day separator');

  // Sixty more messages (sent over HTTP with alice's token) while bob's page has no chat
  // open: he opens it at an "unread" divider above the first of them, the newest is read
  // only once he scrolls down to it, and the "newest" button counts what arrives meanwhile.
  await bob.page.reload();
  await bob.page.waitForSelector('#threads li >> text=alice');
  const token = await alice.page.evaluate(() => localStorage.getItem('pigeon.token'));
  const threadId = await alice.page.evaluate(() => document.querySelector('#threads li.active').dataset.thread);
  const rpcSend = async (n) => {
    const sent = await fetch(`${base}/v1/rpc`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
      body: JSON.stringify({ type: 'send', id: n, thread_id: threadId, client_msg_id: `bulk-${n}`, body: `bulk ${n}` }),
    });
    check(sent.ok, `rpc send ${n}: ${sent.status}`);
  };
  for (let n = 0; n < 60; n += 1) await rpcSend(n);
  await bob.page.waitForSelector('#threads li .badge:text("60")');
  await bob.page.click('#threads li >> text=alice');
  await bob.page.waitForSelector('#unread-divider:text("60 unread messages")');
  check(await bob.page.evaluate(() => {
    const divider = document.querySelector('#unread-divider');
    return divider.nextElementSibling.textContent.startsWith('bulk 0');
  }), 'the divider stands right above the first unread message');
  await bob.page.waitForSelector('#jump:not([hidden])');
  await alice.page.waitForSelector('#messages li.mine:has-text("bulk 59") .meta[data-status="delivered"]');
  await rpcSend(60);
  await bob.page.waitForSelector('#jump:text("↓ 1 new")');
  await shot(bob.page, 'unread.png');
  check(await alice.page.locator('#messages li.mine:has-text("bulk 59") .meta[data-status="read"]').count() === 0,
    'not read while out of view');
  await bob.page.click('#jump');
  await bob.page.waitForSelector('#jump', { state: 'hidden' });
  await alice.page.waitForSelector('#messages li.mine:has-text("bulk 60") .meta[data-status="read"]');
  await bob.page.waitForFunction(() => document.title === 'Pigeon');

  // After a reload alice is still logged in and sees the history: the newest fifty,
  // then the older ones when she scrolls up.
  await alice.page.reload();
  await alice.page.waitForSelector('#threads li >> text=bob');
  await alice.page.click('#threads li >> text=bob');
  await alice.page.waitForSelector('#messages li >> text=bulk 60');
  await alice.page.waitForSelector('#messages li >> text=bulk 11');
  await alice.page.waitForSelector('#threads li:has-text("bob") .preview:text-is("You: bulk 60")');
  await bob.page.waitForSelector('#threads li:has-text("alice") .preview:text-is("bulk 60")');
  check(await alice.page.locator('#messages li', { hasText: 'hello bob' }).count() === 0, 'the oldest are not loaded yet');
  check(await alice.page.locator('#unread-divider').count() === 0, 'her own messages are not unread');
  // Scroll to the top (again, if a render moved it) until the older page is in.
  await alice.page.waitForFunction(() => {
    const list = document.querySelector('#messages');
    list.scrollTop = 0;
    return [...list.children].some((li) => li.textContent.startsWith('hello bob'));
  }, null, { polling: 300 });

  // A private name for the chat, seen only in alice's list.
  await alice.page.click('#open-details');
  await enter(alice.page, '#nickname-value', 'Bobby B');
  await alice.page.waitForSelector('#threads li >> text=Bobby B');
  await alice.page.waitForSelector('#chat-title:text("Bobby B")');
  await enter(alice.page, '#nickname-value', '');
  await alice.page.waitForSelector('#chat-title:text-is("bob")');
  await alice.page.keyboard.press('Escape');

  // A group of three.
  const carol = await person('carol');
  await alice.page.fill('#new-group-title', 'trio');
  await enter(alice.page, '#new-group-members', 'bob, carol');
  await alice.page.waitForSelector('#chat-title:text("trio")');
  await enter(alice.page, '#body', 'hi all');
  for (const member of [bob, carol]) {
    await member.page.click('#threads li >> text=trio');
    await member.page.waitForSelector('#messages li >> text=hi all');
  }
  await enter(carol.page, '#body', 'hi from carol');
  const fromCarol = await alice.page.waitForSelector('#messages li:not(.mine) >> text=hi from carol');
  check((await fromCarol.textContent()).startsWith('carol'), 'group messages name their sender');
  // Both others have the group open: alice's message is read by all.
  await alice.page.waitForSelector('#messages li.mine:has-text("hi all") .meta[data-status="read"]');
  // Still after a reload, from the members' markers rather than live receipts.
  await alice.page.reload();
  await alice.page.click('#threads li >> text=trio');
  await alice.page.waitForSelector('#messages li.mine:has-text("hi all") .meta[data-status="read"]');
  await alice.page.waitForSelector('#messages li:not(.mine):has-text("hi from carol") .sender:text("carol")');
  await shot(alice.page, 'group.png');

  // The group's details: rename it (the others see the new title), mute it.
  await alice.page.click('#open-details');
  await alice.page.waitForSelector('#members li >> text=carol');
  // Remove carol and add her back.
  await alice.page.click('#members li:has-text("carol") button:text("Remove")');
  await alice.page.waitForFunction(() => ![...document.querySelectorAll('#members li')].some((li) => li.textContent.includes('carol')));
  await enter(alice.page, '#add-member-user', 'carol');
  await alice.page.waitForSelector('#members li >> text=carol');
  await enter(alice.page, '#rename-title', 'trio two');
  await bob.page.waitForSelector('#threads li >> text=trio two');
  await bob.page.waitForSelector('#threads li:has-text("trio two") .preview:text-is("alice changed the group")');
  await alice.page.click('#toggle-mute');
  await alice.page.waitForSelector('#toggle-mute:text("Unmute")');
  await alice.page.keyboard.press('Escape');
  await alice.page.waitForSelector('#details', { state: 'hidden' });
  await alice.page.waitForSelector('#threads li >> text=trio two · muted');
  // Archived chats fold away under one row, open on request, and come back.
  await alice.page.click('#open-details');
  await alice.page.click('#toggle-archive');
  await alice.page.waitForSelector('#toggle-archive:text("Unarchive")');
  await alice.page.keyboard.press('Escape');
  await alice.page.waitForSelector('#toggle-archived:has-text("Archived (1)")');
  await alice.page.click('#threads li >> text=bob');
  await alice.page.waitForFunction(() => ![...document.querySelectorAll('#threads li')].some((li) => li.textContent.includes('trio two')));
  await alice.page.click('#toggle-archived');
  await alice.page.waitForSelector('#threads li.heading ~ li >> text=trio two');
  await alice.page.click('#threads li >> text=trio two');
  await alice.page.click('#open-details');
  await alice.page.click('#toggle-archive');
  await alice.page.waitForSelector('#toggle-archive:text-is("Archive")');
  await alice.page.keyboard.press('Escape');
  check(await alice.page.locator('#threads li.heading').count() === 0, 'nothing archived any more');

  // Contacts: bob asks alice to be friends, she accepts; she sees her own device.
  await bob.page.click('#open-people');
  await enter(bob.page, '#add-contact-user', 'alice');
  await bob.page.waitForSelector('#contacts li >> text=alice — requested');
  await bob.page.keyboard.press('Escape');
  await alice.page.click('#open-people');
  await alice.page.waitForSelector('#devices li >> text=(this one)');
  await alice.page.click('#contacts li:has-text("bob") button:text("Accept")');
  await alice.page.waitForSelector('#contacts li >> text=bob — friend');
  // Hiding her last-seen time sticks (the dialog reads it back from the server).
  await alice.page.check('#hide-last-seen');
  await alice.page.waitForFunction(() => document.querySelector('#people-error').textContent === '');
  await shot(alice.page, 'people.png');
  await alice.page.keyboard.press('Escape');
  await alice.page.reload();
  await alice.page.waitForSelector('#threads li >> text=bob');
  await alice.page.click('#open-people');
  await alice.page.waitForSelector('#hide-last-seen:checked');
  await alice.page.keyboard.press('Escape');

  // Carol leaves the group: it is gone from her list.
  await carol.page.waitForSelector('#threads li >> text=trio two');
  await carol.page.click('#threads li >> text=trio two');
  await carol.page.click('#open-details');
  await carol.page.click('#leave');
  await carol.page.waitForSelector('#details', { state: 'hidden' });
  await carol.page.waitForFunction(() => ![...document.querySelectorAll('#threads li')].some((li) => li.textContent.includes('trio')));

  // The server dies mid-conversation: the page says so, keeps what is typed, and once
  // the server is back sends it exactly once.
  await alice.page.click('#threads li >> text=bob');
  await bob.page.click('#threads li >> text=alice');
  await server('STOP');
  await alice.page.waitForSelector('#banner:not([hidden])');
  await enter(alice.page, '#body', 'sent while the server was down');
  await alice.page.waitForSelector('#messages li.mine .meta[data-status="pending"]');
  await shot(alice.page, 'offline.png');
  await server('START');
  await alice.page.waitForSelector('#banner', { state: 'hidden', timeout: 30000 });
  await alice.page.waitForSelector('#messages li.mine >> text=sent while the server was down');
  await alice.page.waitForFunction(() => document.querySelectorAll('#messages .meta[data-status="pending"]').length === 0);
  await bob.page.waitForSelector('#messages li >> text=sent while the server was down', { timeout: 30000 });
  const copies = await bob.page.locator('#messages li', { hasText: 'sent while the server was down' }).count();
  check(copies === 1, `the queued message arrived once, not ${copies} times`);
  const kept = await bob.page.locator('#messages li', { hasText: 'hello bob' }).count();
  check(kept === 1, `history kept, once (${kept} times)`);

  // Alice blocks bob: his next message fails, with a retry; once unblocked, the retry
  // delivers it.
  await alice.page.click('#open-people');
  await alice.page.click('#contacts li:has-text("bob") button:text("Block")');
  await alice.page.waitForSelector('#contacts li >> text=bob — blocked');
  await enter(bob.page, '#body', 'are you there?');
  await bob.page.waitForSelector('#messages li.mine .meta[data-status="failed"]');
  // The failed send is kept across a reload (the outbox is in localStorage).
  await bob.page.reload();
  await bob.page.click('#threads li >> text=alice');
  await bob.page.waitForSelector('#messages li.mine:has-text("are you there?") .meta[data-status="failed"]');
  await alice.page.click('#contacts li:has-text("bob") button:text("Unblock")');
  // Unblocking does not restore the friendship the block ended, so bob may leave the
  // book altogether (waiting for a "Block" button here raced a stale render).
  await alice.page.waitForFunction(() => ![...document.querySelectorAll('#contacts li')]
    .some((li) => li.textContent.includes('bob — blocked')));
  check(await alice.page.locator('#people-error').innerText() === '', 'the unblock was accepted');
  await alice.page.keyboard.press('Escape');
  await bob.page.click('#messages button.retry');
  await alice.page.waitForSelector('#messages li:not(.mine) >> text=are you there?');
  check(await bob.page.locator('#messages .meta[data-status="failed"]').count() === 0, 'the retry went through');

  // Alice revokes a second device of hers: that page is logged out.
  const second = await browser.newContext();
  const other = await second.newPage();
  other.setDefaultTimeout(TIMEOUT);
  await other.goto(base);
  await other.fill('#username', 'alice');
  await other.fill('#password', 'correct horse');
  await other.click('#login-button');
  await other.waitForSelector('#app:not([hidden])');
  await alice.page.click('#open-people');
  await alice.page.click('#devices li:not(:has-text("this one")) button:text("Revoke")');
  await other.waitForSelector('#login:not([hidden])');
  await alice.page.keyboard.press('Escape');

  // A phone-sized screen shows one pane at a time.
  await alice.page.setViewportSize({ width: 390, height: 760 });
  check(await alice.page.isVisible('#chat'), 'the open chat fills a small screen');
  check(!(await alice.page.isVisible('.sidebar')), 'the list is hidden behind it');
  await shot(alice.page, 'phone.png');

  // A lost connection logs a failed WebSocket in the console: expected while stopped.
  // Logging out ends the session: the login form comes back, also after a reload.
  await carol.page.click('#logout');
  await carol.page.waitForSelector('#login:not([hidden])');
  await carol.page.reload();
  await carol.page.waitForSelector('#login:not([hidden])');

  const problems = [...alice.problems, ...bob.problems, ...carol.problems]
    .filter((p) => !p.includes('WebSocket') && !p.includes('ERR_CONNECTION_REFUSED'));
  check(problems.length === 0, `no errors in the pages: ${problems.join('; ')}`);
  console.log('browser chat: ok');
} finally {
  await browser.close();
  process.stdin.destroy();
}
