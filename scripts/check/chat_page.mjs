// Drives the chat page of a running `colossal serve` in headless Chromium: types a message,
// sends it with Enter, waits for the streamed reply, checks it is there, takes a screenshot.
// Usage: node chat_page.mjs URL SCREENSHOT.png   (playwright-core on NODE_PATH)
import { chromium } from 'playwright-core';

const [url, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 900, height: 640 } });
const errors = [];
page.on('pageerror', e => errors.push(e.message));
await page.goto(url);
await page.waitForFunction(() => document.getElementById('model').textContent !== '…');
for (const text of ['Hello! Who are you?', 'Tell me a story about a king.']) {
  await page.fill('#max_tokens', '40');
  await page.click('#input');
  await page.keyboard.type(text);
  await page.keyboard.press('Enter');
  const n = await page.locator('.msg.assistant[data-done="1"]').count();
  await page.locator('.msg.assistant[data-done="1"]').nth(n).waitFor({ timeout: 60000 });
}
const users = await page.locator('.msg.user').allTextContents();
const replies = await page.locator('.msg.assistant').allTextContents();
const metas = await page.locator('.meta').allTextContents();
const errorsShown = await page.locator('.msg.error').count();
await page.screenshot({ path: shot, fullPage: true });
await browser.close();
const ok = users.length === 2 && replies.length === 2 && replies.every(r => r.trim().length > 0)
  && errorsShown === 0 && errors.length === 0 && metas.every(m => /tokens\/s/.test(m));
console.log(JSON.stringify({ ok, users, replies, metas, page_errors: errors, screenshot: shot }, null, 1));
process.exit(ok ? 0 : 1);
