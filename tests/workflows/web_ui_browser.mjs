// A person's way through the Temporal Web UI, in headless Chromium driven by Playwright. Run by
// tests/workflows/test_web_ui_browser.py, which passes everything through the environment and reads the one JSON
// line this prints. Two walks, chosen by SCENARIO:
//   start     start a build on the Start Workflow page with the template given through the page's file upload,
//             find it in the workflow list filtered by KilnRunState, open it and read its input as the key holder
//             does; then open the same build in a browser whose UI has no codec endpoint, as everyone else does.
//   schedule  find a kiln schedule on the Schedules page (its spec and upcoming runs), open it (its spec and its
//             recent run), and find its build in the workflow list filtered by KilnTemplate.
import { chromium } from 'playwright-core';

const { SCENARIO, UI, SHOTS } = process.env;
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run',
];
const VIEWPORT = { width: 1400, height: 1000 };

const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: FLAGS });
let current = null; // the page a failure's screenshot is taken of

async function openPage(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(60_000);
  page.codecCalls = [];
  page.on('request', (request) => {
    const path = new URL(request.url()).pathname;
    if (path === '/encode' || path === '/decode') page.codecCalls.push(path);
  });
  current = page;
  return page;
}

const calls = (page) => [...new Set(page.codecCalls)].sort();

// Visibility lags a change by a moment, and a loaded machine renders a page slowly: give each look time to
// render before asking again, or a slow page is reloaded before it ever shows its rows.
async function untilShown(shown, ask, seconds = 120) {
  const deadline = Date.now() + seconds * 1_000;
  for (;;) {
    await ask();
    try {
      await shown.waitFor({ timeout: 10_000 });
      return;
    } catch (error) {
      if (Date.now() > deadline) throw error;
    }
  }
}

// The workflow list, filtered as a user types it.
async function search(page, query, shown) {
  await page.goto(`${UI}/namespaces/default/workflows`);
  await page.getByTestId('toggle-manual-query').click();
  const input = page.getByTestId('workflow-manual-search-input');
  await untilShown(shown, async () => {
    await input.fill(query);
    await input.press('Enter');
  });
}

const link = (page, name) => page.getByRole('link', { name, exact: true }).first();

async function startWorkflow() {
  const { WORKFLOW_ID, TASK_QUEUE, TEMPLATE, MARKER, SEALED_ENCODING } = process.env;
  const page = await openPage(await browser.newContext({ viewport: VIEWPORT }));
  await page.goto(`${UI}/namespaces/default/workflows/start-workflow`);
  await page.getByTestId('workflowId').fill(WORKFLOW_ID);
  await page.getByTestId('taskQueue').fill(TASK_QUEUE);
  await page.getByTestId('workflowType').fill('ImageBuild');
  await page.locator('input[type=file]').setInputFiles(TEMPLATE);
  await page.getByText(MARKER).filter({ visible: true }).first().waitFor(); // the upload is in the editor
  await page.screenshot({ path: `${SHOTS}/1-start-workflow.png`, fullPage: true });
  await page.getByTestId('start-workflow-button').click();
  await page.getByText('Workflow started successfully').first().waitFor();

  const row = link(page, WORKFLOW_ID);
  await search(page, `KilnRunState = "Succeeded" AND WorkflowId = "${WORKFLOW_ID}"`, row);
  await page.screenshot({ path: `${SHOTS}/2-list-by-run-state.png`, fullPage: true });

  await row.click();
  await page.waitForURL(`**/workflows/${WORKFLOW_ID}/**`);
  // The Input panel, decrypted by the codec server for this browser.
  await page.getByText(MARKER).filter({ visible: true }).first().waitFor();
  await page.screenshot({ path: `${SHOTS}/3-build-with-decrypted-input.png`, fullPage: true });

  // Everyone else: the same UI as a UI server without a codec endpoint serves it (its settings say none), so the
  // page has nothing to decode with and shows what the history holds. The browser's own Data Encoder setting
  // cannot say none: an empty endpoint there falls back to the server's.
  const context = await browser.newContext({ viewport: VIEWPORT });
  await context.route('**/api/v1/settings**', async (route) => {
    const response = await route.fetch();
    const settings = await response.json();
    settings.Codec.Endpoint = '';
    await route.fulfill({ response, json: settings });
  });
  const keyless = await openPage(context);
  await keyless.goto(`${UI}/namespaces/default/workflows/${WORKFLOW_ID}`);
  await keyless.getByTestId('history-tab').click();
  await keyless.getByTestId('json').click(); // the first event as JSON: the start, with its input's metadata
  const event = keyless.getByTestId('event-history-json');
  await event.getByText(SEALED_ENCODING).first().waitFor();
  const panel = keyless.getByTestId('input-and-result');
  await panel.getByText(/"[A-Za-z0-9+/]{64,}/).first().waitFor(); // the input, as it is in history
  await keyless.screenshot({ path: `${SHOTS}/4-build-without-the-key.png`, fullPage: true });
  return {
    codecCalls: calls(page),
    keyless: {
      codecCalls: calls(keyless),
      input: await panel.innerText(),
      event: await event.innerText(),
      page: await keyless.locator('body').innerText(),
    },
  };
}

async function schedule() {
  const { SCHEDULE_ID, SCHEDULE_RUN, TEMPLATE_NAME, BUILD, SPEC } = process.env;
  const page = await openPage(await browser.newContext({ viewport: VIEWPORT }));
  const listed = link(page, SCHEDULE_ID);
  await untilShown(listed, () => page.goto(`${UI}/namespaces/default/schedules`)); // listed from visibility too
  const row = page.getByRole('row').filter({ has: listed });
  await row.getByText(SPEC).waitFor();
  await page.screenshot({ path: `${SHOTS}/5-schedules.png`, fullPage: true });
  const listRow = await row.innerText();

  await listed.click();
  await page.waitForURL(`**/schedules/${SCHEDULE_ID}`);
  await page.getByTestId('schedule-name').filter({ hasText: SCHEDULE_ID }).waitFor();
  await page.getByText(SPEC).first().waitFor();
  // Recent runs are a list, each item a status badge beside the run's link.
  const recent = page.getByRole('listitem').filter({ has: link(page, SCHEDULE_RUN) });
  const recentStatus = await recent.getByTestId('execution-status').innerText();
  await page.screenshot({ path: `${SHOTS}/6-schedule.png`, fullPage: true });
  const detail = await page.locator('main').innerText();

  // The build's row once visibility has its end.
  const built = page.getByRole('row').filter({ has: link(page, BUILD), hasText: 'Completed' });
  await search(page, `KilnTemplate = "${TEMPLATE_NAME}"`, built);
  await page.screenshot({ path: `${SHOTS}/7-list-by-template.png`, fullPage: true });
  const workflows = await page.getByRole('row').evaluateAll((rows) =>
    rows.map((r) => ({ links: [...r.querySelectorAll('a')].map((a) => a.textContent.trim()), text: r.innerText })),
  );
  return { listRow, recentStatus, detail, workflows: workflows.filter((r) => r.links.length) };
}

try {
  const walks = { start: startWorkflow, schedule };
  const result = await walks[SCENARIO]();
  console.log(JSON.stringify({ ok: true, ...result }));
} catch (error) {
  let text = '';
  if (current) {
    await current.screenshot({ path: `${SHOTS}/failed-${SCENARIO}.png`, fullPage: true }).catch(() => {});
    text = await current.locator('body').innerText({ timeout: 5_000 }).catch(() => '');
  }
  console.log(JSON.stringify({ ok: false, error: String(error), url: current?.url(), text: text.slice(0, 4000) }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
