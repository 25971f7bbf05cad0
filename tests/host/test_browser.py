"""Every example workflow in the real ComfyUI frontend, in headless Chromium, as a user would use it.

For each ``workflows/*.json``: open ComfyUI's page, close the first-start templates dialog, open the file
through the frontend's own file input (what "Open" and drag-and-drop feed), check that no dialog came up
(missing nodes, load errors) and that every node type is registered and none is marked as erroneous
(red), shrink the image size and step count as a user would edit widgets (CPU time), press Run, wait
for the job to finish on the server, check no node turned red, and save a screenshot under
``tests/artifacts/browser/``.

``test_help_panel_shows_the_pack_page`` selects an Atelier node and presses the info button: the help panel must
show the pack's own page (web/docs), in English and, with the Chinese locale, the Chinese page and node name.

With ``ATELIER_WRITE_THUMBNAILS=1`` a passing run also writes the template-browser thumbnail
``workflows/<name>.jpg``: the graph after the run, cropped to its nodes and groups, drawn at full detail
(no low-detail shortcut, no minimap), about 512 px wide, JPEG quality 80, under 80 KB.

Needs Chromium (Debian's ``chromium`` package, or ``ATELIER_CHROMIUM``) and the ``playwright`` Python
package (driver only; its own browser download is never used). Skipped, with the reason, without them.
"""
import os
import pathlib
import shutil
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SMALL = 64
MAX_STEPS = 2
THUMB_WIDTH = 512
THUMB_MAX_BYTES = 80_000

pytestmark = pytest.mark.host


def _chromium():
    explicit = os.environ.get("ATELIER_CHROMIUM")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip("browser tests skipped: no Chromium (apt-get install chromium, or set ATELIER_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests skipped: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


# --------------------------------------------------------------------------------------------------
# page helpers (the frontend exposes window.app and window.LiteGraph for extensions)

def open_comfyui(page, server):
    # a fresh ComfyUI greets the user with the templates browser, once: the frontend then records the
    # user setting Comfy.TutorialCompleted on the server, and later page loads open no dialog
    first_start = not server.get_json("/settings").get("Comfy.TutorialCompleted")
    page.goto(server.url, wait_until="networkidle", timeout=180_000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady", timeout=180_000)
    if first_start:  # close the templates browser like a user would
        close = page.locator('.p-dialog button[aria-label="Close dialog"]')
        deadline = time.time() + 15
        while time.time() < deadline and close.count() == 0:
            time.sleep(0.25)
        if close.count():
            close.first.click()
    page.wait_for_function("() => document.querySelectorAll('.p-dialog').length === 0", timeout=15_000)


def open_dialogs(page):
    return page.evaluate("() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 400))")


def graph_nodes(page):
    """[id, type, registered, has_errors, output images] for every node of the loaded graph."""
    return page.evaluate(
        """() => app.graph.nodes.map(n => [n.id, n.type, !!LiteGraph.registered_node_types[n.type],
                                            !!n.has_errors, (n.imgs || []).length])"""
    )


def shrink_widgets(page, overrides):
    """What a user on a CPU would do: a small latent and few steps (same as the headless host test),
    plus the per-workflow widget values the host preparers ask for ("<node id or type>.<input>": value)."""
    page.evaluate(
        """([small, maxSteps, overrides]) => {
             for (const n of app.graph.nodes) {
               for (const w of (n.widgets || [])) {
                 if (n.type === 'EmptyLatentImage' && ['width', 'height'].includes(w.name)) w.value = small;
                 if (n.type === 'EmptyLatentImage' && w.name === 'batch_size') w.value = 1;
                 if (n.type.startsWith('KSampler') && w.name === 'steps') w.value = Math.min(w.value, maxSteps);
               }
             }
             for (const [key, value] of Object.entries(overrides)) {
               const dot = key.lastIndexOf('.');
               const target = key.slice(0, dot), input = key.slice(dot + 1);
               for (const n of app.graph.nodes) {
                 if (String(n.id) !== target && n.type !== target) continue;
                 for (const w of (n.widgets || [])) if (w.name === input) w.value = value;
               }
             }
             app.graph.setDirtyCanvas(true, true);
           }""",
        [SMALL, MAX_STEPS, overrides],
    )


def write_thumbnail(page, workflow):
    """workflows/<name>.jpg from the graph on screen: fit, crop to the nodes and groups, shrink, JPEG."""
    from PIL import Image

    page.evaluate(
        """async () => {
             const settings = app.extensionManager.setting;
             for (const [id, value] of [['LiteGraph.Canvas.MinFontSizeForLOD', 0], ['Comfy.Minimap.Visible', false]]) {
               try { await settings.set(id, value); } catch (e) { /* older frontends lack a setting: keep going */ }
             }
             app.extensionManager.command.execute('Comfy.Canvas.FitView');
             app.graph.setDirtyCanvas(true, true);
           }"""
    )
    time.sleep(0.8)
    box = page.evaluate(
        """() => {
             const rects = app.graph.nodes.map(n => n.boundingRect).concat(app.graph.groups.map(g => g._bounding));
             const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
             const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
             const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
             const sx = x => c.left + (x + ds.offset[0]) * ds.scale, sy = y => c.top + (y + ds.offset[1]) * ds.scale;
             return [sx(x0) - 8, sy(y0) - 8, sx(x1) + 8, sy(y1) + 8, c.left, c.top, c.right, c.bottom];
           }"""
    )
    left, top = max(box[0], box[4]), max(box[1], box[5])
    right, bottom = min(box[2], box[6]), min(box[3], box[7])
    shot = ARTIFACTS / f"{workflow.stem}.thumb.png"
    page.screenshot(path=str(shot), clip={"x": left, "y": top, "width": right - left, "height": bottom - top})
    image = Image.open(shot).convert("RGB")
    image = image.resize((THUMB_WIDTH, max(1, round(image.height * THUMB_WIDTH / image.width))), Image.LANCZOS)
    target = workflow.with_suffix(".jpg")
    tmp = target.with_suffix(".jpg.part")
    for quality in (80, 70, 60, 50):
        image.save(tmp, "JPEG", quality=quality, optimize=True)
        if tmp.stat().st_size < THUMB_MAX_BYTES:
            break
    os.replace(tmp, target)
    return target


def wait_for_new_job(server, known, timeout):
    """The prompt id and history entry of the first job not in ``known``, once it completed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server.get_json("/history")
        fresh = {k: v for k, v in history.items() if k not in known}
        for prompt_id, entry in fresh.items():
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                return prompt_id, entry
        time.sleep(1)
    raise AssertionError(f"no job finished within {timeout} s after pressing Run")


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_in_real_frontend(comfy_server, browser, workflow):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    passed = False
    try:
        open_comfyui(page, comfy_server)
        page.set_input_files("#comfy-file-input", str(workflow))
        page.wait_for_function("(n) => app.graph.nodes.length >= n", arg=1, timeout=30_000)
        time.sleep(1.0)  # dialogs (missing nodes, missing models) open asynchronously after load
        assert open_dialogs(page) == [], f"{workflow.name}: the frontend opened a dialog on load"
        nodes = graph_nodes(page)
        unknown = [(i, t) for i, t, registered, _, _ in nodes if not registered]
        assert not unknown, f"{workflow.name}: node types the frontend does not know: {unknown}"
        red = [(i, t) for i, t, _, bad, _ in nodes if bad]
        assert not red, f"{workflow.name}: nodes marked with errors after loading: {red}"

        shrink_widgets(page, getattr(comfy_server, "workflow_overrides", {}).get(workflow.name, {}))
        known = set(comfy_server.get_json("/history"))
        page.get_by_role("button", name="Run").first.click()
        prompt_id, entry = wait_for_new_job(comfy_server, known, timeout=900)
        status = entry.get("status", {})
        assert status.get("status_str") == "success", f"{workflow.name}: job {prompt_id} failed: {status}"
        images = [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]
        assert images, f"{workflow.name}: the job produced no image"

        time.sleep(1.5)  # let the frontend draw the previews
        page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")  # whole graph
        time.sleep(0.5)
        red = [(i, t) for i, t, _, bad, _ in graph_nodes(page) if bad]
        assert not red, f"{workflow.name}: nodes marked with errors after running: {red}"
        assert errors == [], f"{workflow.name}: JavaScript errors in the page: {errors}"
        passed = True
    finally:
        page.screenshot(path=str(ARTIFACTS / f"{workflow.stem}.png"))
        if passed and os.environ.get("ATELIER_WRITE_THUMBNAILS") == "1":
            write_thumbnail(page, workflow)
        page.close()


# --------------------------------------------------------------------------------------------------
# the node help panel: the pack's page for the node (web/docs), in the user's language


def show_node_help(page, node_type):
    """Put one node on an empty canvas, select it and press the selection toolbox's info button, as a user does;
    the rendered help text (None when the frontend fell back to the schema because no page was found)."""
    page.evaluate(
        """(type) => { app.graph.clear(); const n = LiteGraph.createNode(type); n.pos = [300, 300];
                       app.graph.add(n); app.canvas.selectNode(n); app.graph.setDirtyCanvas(true, true); }""",
        node_type,
    )
    page.locator('[data-testid="info-button"]').first.click(timeout=15_000)
    page.wait_for_function(
        "() => document.querySelector('.node-help-content .markdown-content, .node-help-content .fallback-content')",
        timeout=30_000)
    return page.evaluate(
        "() => { const md = document.querySelector('.node-help-content .markdown-content'); return md && md.innerText; }")


def test_help_panel_shows_the_pack_page(comfy_server, browser):
    import json

    node, locale = "AtelierPLMSSampler", "zh"
    zh_name = json.loads((ROOT / "locales" / locale / "nodeDefs.json").read_text(encoding="utf-8"))[node]["display_name"]
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    try:
        open_comfyui(page, comfy_server)
        text = show_node_help(page, node)
        assert text, "the help panel found no page for the node (it fell back to the schema's description)"
        assert text.splitlines()[0] == "PLMS Sampler (Atelier)" and "first_step" in text
        page.evaluate("async (l) => { await app.extensionManager.setting.set('Comfy.Locale', l); }", locale)
        open_comfyui(page, comfy_server)
        text = show_node_help(page, node)
        assert text and text.splitlines()[0] == zh_name, f"the {locale} page did not load: {text and text[:200]!r}"
        assert page.evaluate("() => app.graph.nodes.map(n => n.title)") == [zh_name], "locales/zh not merged"
    finally:
        page.screenshot(path=str(ARTIFACTS / "help_panel.png"))
        page.close()
        comfy_server.post_json("/settings/Comfy.Locale", "en")  # the other browser tests press "Run" in English
