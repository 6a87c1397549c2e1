// A person's way through the Temporal Web UI, in headless Chromium driven by Playwright: start a build on the
// Start Workflow page with the template given through the page's file upload, find it in the workflow list
// filtered by KilnRunState, open it, and read its input. Run by tests/workflows/test_web_ui_browser.py, which
// passes everything through the environment and reads the one JSON line this prints.
import { chromium } from 'playwright-core';

const { UI, WORKFLOW_ID, TASK_QUEUE, TEMPLATE, SHOTS, MARKER } = process.env;
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run',
];

const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: FLAGS });
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
page.setDefaultTimeout(30_000);
const codecCalls = [];
page.on('request', (request) => {
  const path = new URL(request.url()).pathname;
  if (path === '/encode' || path === '/decode') codecCalls.push(path);
});

try {
  await page.goto(`${UI}/namespaces/default/workflows/start-workflow`);
  await page.getByTestId('workflowId').fill(WORKFLOW_ID);
  await page.getByTestId('taskQueue').fill(TASK_QUEUE);
  await page.getByTestId('workflowType').fill('ImageBuild');
  await page.locator('input[type=file]').setInputFiles(TEMPLATE);
  await page.getByText(MARKER).filter({ visible: true }).first().waitFor(); // the upload is in the editor
  await page.screenshot({ path: `${SHOTS}/1-start-workflow.png`, fullPage: true });
  await page.getByTestId('start-workflow-button').click();
  await page.getByText('Workflow started successfully').first().waitFor();

  // The list, filtered as a user types it; visibility lags the build's end by a moment, so search again.
  await page.goto(`${UI}/namespaces/default/workflows`);
  await page.getByTestId('toggle-manual-query').click();
  const search = page.getByTestId('workflow-manual-search-input');
  const row = page.getByRole('link', { name: WORKFLOW_ID, exact: true }).first();
  for (let attempt = 0; ; attempt++) {
    await search.fill(`KilnRunState = "Succeeded" AND WorkflowId = "${WORKFLOW_ID}"`);
    await search.press('Enter');
    try {
      await row.waitFor({ timeout: 2_000 });
      break;
    } catch (error) {
      if (attempt >= 45) throw error;
    }
  }
  await page.screenshot({ path: `${SHOTS}/2-list-by-run-state.png`, fullPage: true });

  await row.click();
  await page.waitForURL(`**/workflows/${WORKFLOW_ID}/**`);
  // The Input panel, decrypted by the codec server for this browser.
  await page.getByText(MARKER).filter({ visible: true }).first().waitFor();
  await page.screenshot({ path: `${SHOTS}/3-build-with-decrypted-input.png`, fullPage: true });
  console.log(JSON.stringify({ ok: true, codecCalls: [...new Set(codecCalls)].sort() }));
} catch (error) {
  await page.screenshot({ path: `${SHOTS}/failed.png`, fullPage: true });
  console.log(JSON.stringify({ ok: false, error: String(error), url: page.url() }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
