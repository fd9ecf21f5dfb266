// Drives the OHIF v3 viewer bundled with MONAI Label in Debian's headless Chromium (playwright-core).
//
// Usage: node ohif_flow.mjs <config.json>
// config: {server, patient, model, label, points: [[i, j, k], ...], box_px, shots, profile, chromium, infer_timeout_ms}
// Opens the study list, the study in the MONAI Label mode, connects the MONAI Label panel to `server`, picks the
// Point Prompts tab, `model` and `label`, scrolls the axial view with the mouse wheel to each point's slice and
// clicks it (the panel's own probe tool), runs, and reads the panel's labelmap back.
// Writes <shots>/NN_step.png at each step and <shots>/result.json, and prints one line "RESULT <json>" at the
// end (also on failure, with "error" set), so that the Python test can assert on what the viewer did.

import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const result = { steps: [], shots: [], console_errors: [], page_errors: [], html_for_asset: [], failed_requests: [] };
let shotNo = 0;

function step(name, extra = {}) {
  const entry = { name, t: Date.now(), ...extra };
  result.steps.push(entry);
  console.log(`STEP ${name} ${JSON.stringify(extra)}`);
}

async function shot(page, name) {
  shotNo += 1;
  const file = path.join(config.shots, `${String(shotNo).padStart(2, '0')}_${name}.png`);
  await page.screenshot({ path: file });
  result.shots.push(file);
  return file;
}

// Poll a function evaluated in the page until ``ok`` accepts what it returns.
async function waitForPage(page, fn, arg, ok, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await page.evaluate(fn, arg);
      if (ok(last)) return last;
    } catch (e) {
      last = String(e);
    }
    await page.waitForTimeout(500);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
}

// State of the axial viewport of the series, read through the viewer's own cornerstone objects.
function axialState() {
  const cs = window.cornerstone;
  const services = window.services;
  if (!cs || !services) return null;
  const engine = cs.getRenderingEngines()[0];
  if (!engine) return null;
  for (const vp of engine.getViewports()) {
    const cam = vp.getCamera();
    const n = cam.viewPlaneNormal || [0, 0, 0];
    if (Math.abs(n[2]) < 0.99) continue; // axial: looking along the patient z axis
    const data = vp.getImageData && vp.getImageData();
    if (!data || !data.imageData) continue;
    const volumeId = vp.getVolumeId ? vp.getVolumeId() : null;
    const volume = volumeId ? cs.cache.getVolume(volumeId) : null;
    const rect = vp.element.getBoundingClientRect();
    return {
      viewportId: vp.id,
      volumeId,
      loaded: !!(volume && volume.loadStatus && volume.loadStatus.loaded),
      dimensions: Array.from(data.dimensions),
      spacing: Array.from(data.spacing),
      sliceIndex: vp.getCurrentImageIdIndex(),
      numberOfSlices: vp.getNumberOfSlices ? vp.getNumberOfSlices() : null,
      rect: { x: rect.x, y: rect.y, width: rect.width, height: rect.height },
    };
  }
  return null;
}

// Page (CSS pixel) position and current depth of voxel ijk in the axial viewport.
function voxelOnPage(ijk) {
  const engine = window.cornerstone.getRenderingEngines()[0];
  const vp = engine.getViewports().find(v => Math.abs((v.getCamera().viewPlaneNormal || [0, 0, 0])[2]) > 0.99);
  const { imageData } = vp.getImageData();
  const world = imageData.indexToWorld(ijk);
  const cam = vp.getCamera();
  const n = cam.viewPlaneNormal;
  const depth = (world[0] - cam.focalPoint[0]) * n[0] + (world[1] - cam.focalPoint[1]) * n[1] + (world[2] - cam.focalPoint[2]) * n[2];
  const canvas = vp.worldToCanvas(world);
  const rect = vp.element.getBoundingClientRect();
  return { x: rect.x + canvas[0], y: rect.y + canvas[1], depthMm: depth, sliceIndex: vp.getCurrentImageIdIndex(), world };
}

// The MONAI Label panel's labelmap (segmentation '1'): voxel counts per value, and the bounding box of non-zero voxels.
function labelmapSummary(withVoxels) {
  const { segmentationService } = window.services;
  const volume = segmentationService.getLabelmapVolume('1');
  if (!volume) return null;
  const data = volume.voxelManager.getCompleteScalarDataArray();
  const [nx, ny] = volume.dimensions;
  const counts = {};
  const voxels = [];
  const lo = [Infinity, Infinity, Infinity];
  const hi = [-1, -1, -1];
  for (let p = 0; p < data.length; p++) {
    const v = data[p];
    if (!v) continue;
    counts[v] = (counts[v] || 0) + 1;
    if (withVoxels) voxels.push(p);
    const ijk = [p % nx, Math.floor(p / nx) % ny, Math.floor(p / (nx * ny))];
    for (let a = 0; a < 3; a++) {
      lo[a] = Math.min(lo[a], ijk[a]);
      hi[a] = Math.max(hi[a], ijk[a]);
    }
  }
  const segs = segmentationService.getSegmentations();
  const segments = [];
  for (const s of segs) {
    for (const [index, seg] of Object.entries(s.segments || (s.config && s.config.segments) || {})) {
      segments.push({ index: Number(index), label: seg.label, color: seg.color });
    }
  }
  const summary = { dimensions: Array.from(volume.dimensions), counts, bbox: hi[0] >= 0 ? [lo, hi] : null, segments };
  if (withVoxels) summary.voxels = voxels; // flat indices i + nx * (j + ny * k), the viewer's voxel order
  return summary;
}

// Scroll the axial viewport with the mouse wheel (the viewer's stack-scroll binding: one notch, one slice) until
// it shows the slice of voxel ijk; return where that voxel is on the page.
async function scrollToVoxel(page, ijk) {
  const state = await page.evaluate(axialState, null);
  await page.mouse.move(state.rect.x + state.rect.width / 2, state.rect.y + state.rect.height / 4);
  let sign = 1; // a positive wheel delta lowers the depth of the target (seen: camera looking along -z)
  let flips = 0;
  let notches = 0;
  for (let tries = 0; tries < 600; tries++) {
    const at = await page.evaluate(voxelOnPage, ijk);
    if (Math.abs(at.depthMm) < 0.5 * state.spacing[2]) return { ...at, wheelNotches: notches };
    await page.mouse.wheel(0, (at.depthMm > 0 ? 100 : -100) * sign);
    notches++;
    await page.waitForTimeout(100);
    const after = await page.evaluate(voxelOnPage, ijk);
    if (Math.abs(after.depthMm) > Math.abs(at.depthMm) + 1e-3) {
      sign = -sign;
      if (++flips > 3) throw new Error(`the mouse wheel does not move the axial slice toward ${ijk}`);
    }
  }
  throw new Error(`could not scroll to the slice of ${ijk}`);
}

// Wait (up to 5 s) for coloured pixels around a click: the probe mark. Moves the mouse off the point after
// 2 s (hover changes make the tool draw again). Returns {pixels, ms, moved}.
async function waitForMark(page, at) {
  const start = Date.now();
  let moved = false;
  let pixels = 0;
  while (Date.now() - start < 5000) {
    await page.waitForTimeout(250);
    const png = await page.screenshot({ clip: { x: at.x - 12, y: at.y - 12, width: 24, height: 24 } });
    pixels = await countColoured(page, png.toString('base64'));
    if (pixels >= 10) break;
    if (!moved && Date.now() - start > 2000) {
      await page.mouse.move(at.x + 30, at.y + 30);
      moved = true;
    }
  }
  return { pixels, ms: Date.now() - start, moved };
}

async function countColoured(page, png) {
  return page.evaluate(async png => {
    const img = new Image();
    img.src = `data:image/png;base64,${png}`;
    await img.decode();
    const c = document.createElement('canvas');
    c.width = img.width;
    c.height = img.height;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let p = 0; p < d.length; p += 4) if (Math.max(d[p], d[p + 1], d[p + 2]) - Math.min(d[p], d[p + 1], d[p + 2]) > 40) n++;
    return n;
  }, png);
}

// Coloured (non-grey) pixels inside a page rectangle of a PNG screenshot: the MR is grey, the overlay is not.
async function colouredPixels(page, file, rect) {
  const png = fs.readFileSync(file).toString('base64');
  return page.evaluate(async ({ png, rect }) => {
    const img = new Image();
    img.src = `data:image/png;base64,${png}`;
    await img.decode();
    const c = document.createElement('canvas');
    c.width = img.width;
    c.height = img.height;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    const d = g.getImageData(Math.round(rect.x), Math.round(rect.y), Math.round(rect.width), Math.round(rect.height)).data;
    let coloured = 0;
    const sum = [0, 0, 0];
    for (let p = 0; p < d.length; p += 4) {
      const spread = Math.max(d[p], d[p + 1], d[p + 2]) - Math.min(d[p], d[p + 1], d[p + 2]);
      if (spread > 40) {
        coloured++;
        sum[0] += d[p]; sum[1] += d[p + 1]; sum[2] += d[p + 2];
      }
    }
    return { coloured, pixels: d.length / 4, mean_rgb: coloured ? sum.map(v => Math.round(v / coloured)) : null };
  }, { png, rect });
}

async function main() {
  fs.mkdirSync(config.shots, { recursive: true });
  fs.rmSync(config.profile, { recursive: true, force: true });
  const context = await chromium.launchPersistentContext(config.profile, {
    executablePath: config.chromium || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1600, height: 1000 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic'],
  });
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(60000);
  page.on('console', m => { if (m.type() === 'error') result.console_errors.push(m.text().slice(0, 300)); });
  page.on('pageerror', e => result.page_errors.push(String(e.message).slice(0, 500)));
  page.on('requestfailed', r => result.failed_requests.push(`${r.url()} ${r.failure() && r.failure().errorText}`));
  page.on('response', r => {
    const u = new URL(r.url());
    const ct = r.headers()['content-type'] || '';
    const rest = u.pathname.startsWith('/ohif/') ? u.pathname.slice('/ohif/'.length) : null;
    if (rest && rest.includes('/') && /\.\w+$/.test(rest) && ct.includes('text/html')) result.html_for_asset.push(u.pathname);
  });
  try {
    // 1. Study list
    await page.goto(`${config.server}/ohif/`, { waitUntil: 'load' });
    await page.getByText(config.patient, { exact: true }).first().waitFor();
    const confirm = page.getByRole('button', { name: 'Confirm and Hide' });
    if (await confirm.isVisible().catch(() => false)) await confirm.click();
    step('study_list', { rows: await page.getByText(config.patient, { exact: true }).count() });
    await shot(page, 'study_list');

    // 2. Open the study in the MONAI Label mode
    await page.getByText(config.patient, { exact: true }).first().click();
    await page.getByRole('button', { name: 'MONAI Label' }).click();
    await page.waitForURL(/\/ohif\/monai-label\?StudyInstanceUIDs=/);
    const state = await waitForPage(page, axialState, null, a => a && a.loaded, 180000, 'the axial viewport with the volume loaded');
    step('viewer', { url: page.url(), axial: state });
    await page.waitForTimeout(1000);
    result.viewer_shot = await shot(page, 'viewer_loaded');
    result.axial = state;

    // 3. MONAI Label panel: connect to this server
    await page.locator('#monailabelServerURL').fill(`${config.server}/`);
    await page.locator('#monailabelServerURL').blur();
    await page.locator('.settingsTable button.actionButton').click();
    await page.getByText('Options / Configurations').waitFor();
    await page.waitForTimeout(1500); // the panel creates the labelmap one second after connecting
    result.panel_text = (await page.locator('.monaiLabelPanel').innerText()).slice(0, 3000);
    step('connected');
    await shot(page, 'monai_label_connected');

    // 4. Point prompts tab, model spd_sam, the target label
    await page.locator('label.tab-label', { hasText: 'Point Prompts' }).click();
    const tab = page.locator('.tab', { has: page.locator('label.tab-label', { hasText: 'Point Prompts' }) });
    result.models = await tab.locator('select.selectBox option').allInnerTexts();
    await tab.locator('select.selectBox').selectOption(config.model);
    await tab.locator('tr.clickable-row', { hasText: new RegExp(`^\\s*${config.label}\\s*$`) }).click();
    step('point_prompts', { models: result.models });
    await shot(page, 'point_prompts_tab');

    // 5. Foreground clicks on the axial view, one per slice
    result.clicks = [];
    for (const ijk of config.points) {
      const at = await scrollToVoxel(page, ijk);
      await page.mouse.click(at.x, at.y);
      // the probe tool draws its mark on the viewport's SVG layer: wait until it is on screen
      const mark = await waitForMark(page, at);
      result.clicks.push({ ijk, x: at.x, y: at.y, sliceIndex: at.sliceIndex, wheelNotches: at.wheelNotches, mark });
      step('click', { ijk, x: Math.round(at.x), y: Math.round(at.y), slice: at.sliceIndex, mark });
      await shot(page, `click_${ijk.join('_')}`);
    }
    result.probe_points = await page.evaluate(() => {
      const mgr = window.cornerstoneTools.annotation.state.getAnnotationManager();
      const all = mgr.saveAnnotations(null, 'ProbeMONAILabel');
      const out = [];
      for (const uid of Object.keys(all || {})) for (const a of all[uid].ProbeMONAILabel || []) out.push(a.data.handles.points[0]);
      return out;
    });

    // 6. Before running: the middle click's slice, for a pixel comparison with the result
    const middle = config.points[Math.floor(config.points.length / 2)];
    const atMiddle = await scrollToVoxel(page, middle);
    await page.waitForTimeout(800);
    const box = { x: atMiddle.x - config.box_px / 2, y: atMiddle.y - config.box_px / 2, width: config.box_px, height: config.box_px };
    result.box = box;
    const beforeFile = await shot(page, 'before_run');
    result.before_shot = beforeFile;
    result.labelmap_before = await page.evaluate(labelmapSummary, false);

    // 7. Run, and wait for the result to reach the labelmap
    const inferResponse = page.waitForResponse(r => r.url().includes(`/infer/${config.model}`) && r.request().method() === 'POST',
      { timeout: config.infer_timeout_ms || 300000 });
    await tab.locator('button[title="Run PointPrompts"]').click();
    const response = await inferResponse;
    result.infer_status = response.status();
    result.infer_url = response.url();
    result.infer_request = response.request().postData() ? response.request().postData().slice(0, 4000) : null;
    await waitForPage(page, labelmapSummary, false, m => m && Object.keys(m.counts).length > 0, 60000,
      'a non-empty labelmap after the run');
    await page.waitForTimeout(1500);
    result.labelmap_after = await page.evaluate(labelmapSummary, true);
    result.success_notification = await page.getByText('Running Inference for Point Prompts - Successful').isVisible();
    const afterFile = await shot(page, 'result_overlay');
    result.result_shot = afterFile;
    const zoom = { x: atMiddle.x - 120, y: atMiddle.y - 120, width: 240, height: 240 };
    shotNo += 1;
    result.zoom_shot = path.join(config.shots, `${String(shotNo).padStart(2, '0')}_result_overlay_zoom.png`);
    await page.screenshot({ path: result.zoom_shot, clip: zoom });
    result.shots.push(result.zoom_shot);
    result.pixels_before = await colouredPixels(page, beforeFile, box);
    result.pixels_after = await colouredPixels(page, afterFile, box);
    result.segmentation_panel = await page.evaluate(() => {
      const { segmentationService } = window.services;
      return segmentationService.getSegmentations().map(s => ({ id: s.segmentationId, label: s.label,
        segments: Object.values(s.segments || {}).map(g => g && g.label) }));
    });
    step('result', { status: result.infer_status, labelmap: result.labelmap_after && result.labelmap_after.counts,
      pixels_before: result.pixels_before, pixels_after: result.pixels_after });
  } catch (e) {
    result.error = String(e && e.stack ? e.stack : e).slice(0, 3000);
    try { await shot(page, 'failure'); } catch (e2) { /* ignore */ }
  } finally {
    fs.writeFileSync(path.join(config.shots, 'result.json'), JSON.stringify(result, null, 1));
    console.log(`RESULT ${JSON.stringify(result)}`);
    await context.close();
  }
}

main();
