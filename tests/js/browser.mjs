// Playwright drives Debian's chromium (no browser download) to a page and reports, as JSON lines on stdout,
// every change of the page's status line and every message it shows. A "close" line on stdin ends it.
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
// Every change of the status line, and every message as it arrives (the page puts new ones first).
let shown = "connecting…";
let messages = 0;
for (;;) {
  const [text, items] = await page.evaluate(() => [
    document.getElementById("status").textContent,
    [...document.querySelectorAll("#messages li")].map((item) => item.textContent),
  ]);
  if (text !== shown) say({ status: (shown = text) });
  for (const item of items.slice(0, items.length - messages).reverse()) say({ message: item });
  messages = items.length;
  await new Promise((resolve) => setTimeout(resolve, 50));
}
