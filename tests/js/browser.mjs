// Playwright drives Debian's chromium (no browser download) to a page and reports, as JSON lines on stdout,
// the page's status once it leaves "connecting…" and then its first message. A "close" line on stdin ends it.
// Usage: node browser.mjs /usr/bin/chromium PAGE_URL
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const [executablePath, pageUrl] = process.argv.slice(2);
const say = (fact) => process.stdout.write(JSON.stringify(fact) + "\n");

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
createInterface({ input: process.stdin }).on("line", async () => {
  await browser.close();
  process.exit(0);
});
const page = await browser.newPage();
await page.goto(pageUrl);
const status = await page.waitForFunction(() => {
  const text = document.getElementById("status").textContent;
  return text !== "connecting…" && text;
}, null, { timeout: 20000 });
say({ status: await status.jsonValue() });
const message = await page.waitForSelector("#messages li", { timeout: 60000 });
say({ message: await message.textContent() });
