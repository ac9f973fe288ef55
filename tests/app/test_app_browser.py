"""`avsync app` driven by a real browser (headless Chromium through selenium), as a person uses it.

The server is the real command (`avsync app`, a subprocess on 127.0.0.1) with a tiny random model, an
index of embedded clips and their videos. Skipped, with the reason, when Chromium, its driver,
selenium or gradio are missing (`.ci/run` installs them; `pip install 'avsync[app]'` and
`apt-get install chromium chromium-driver`).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

MISSING = [name for name in ("selenium", "gradio") if __import__("importlib").util.find_spec(name) is None]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MISSING += [name for name, found in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not found]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"browser tests need chromium, its driver, selenium and gradio (missing: {', '.join(MISSING)}); "
    "install with `apt-get install chromium chromium-driver` and `pip install -e '.[app]'`",
)

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(
    image_size=96, audio_length=192, embed_dim=64, num_heads=4, encoder_depth=2, joint_depth=1,
    decoder_dim=32, decoder_depth=1, decoder_heads=4, num_registers=4,
)  # fmt: skip
MAX_SECONDS = 8.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, checkpoint, clips, bad inputs): `avsync app` serving a tiny model, an index and examples."""
    from avsync.checkpoints import save_backbone
    from avsync.cli import main as avsync_main
    from avsync.model import CAVMAESync
    from avsync.synth import synthesize
    from tests.reliability.hostile_media import tone, write_media

    root = tmp_path_factory.mktemp("app")
    synth = synthesize(root / "synth", clips=5, classes=3, duration=6.0, size=96, workers=0)
    videos = sorted((synth.out_dir / "videos").glob("*.mp4"))
    torch.manual_seed(0)
    checkpoint = save_backbone(CAVMAESync(**TINY).eval(), root / "tiny.safetensors")
    embedded = root / "clips.npz"
    embed = [*map(str, videos), "--ckpt", str(checkpoint), "--out", str(embedded), "--device", "cpu"]
    assert avsync_main(["embed", *embed, "--workers", "0", "--no-progress"]) == 0
    index = root / "index"
    assert (
        avsync_main(["index", "build", str(embedded), "--out", str(index), "--kind", "exact", "--quiet"]) == 0
    )

    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.mp4").write_text("minutes of the meeting, not a video\n" * 50)
    write_media(bad / "silent.mp4", duration=3.0, channels=0)
    write_media(bad / "half_second.mp4", duration=0.5)
    long_times = [k * 0.5 for k in range(40)] + [60.0 * k for k in range(1, 31)]  # 30 min, sparse after 20 s
    write_media(
        bad / "thirty_minutes.mkv", frame_times=long_times, duration=1800.0, channels=1, sample_rate=8000,
        audio_codec="pcm_s16le", audio=tone(1800.0, 8000, 1),
    )  # fmt: skip
    write_media(bad / "uhd.mp4", size=(3840, 2160), fps=8, duration=3.0)

    port = _free_port()
    uploads = root / "gradio"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env["GRADIO_TEMP_DIR"] = str(uploads)
    server = subprocess.Popen(
        [sys.executable, "-m", "avsync.cli", "app", "--ckpt", str(checkpoint), "--index", str(index),
         "--videos", str(synth.out_dir / "videos"), "--examples", str(synth.out_dir / "videos"),
         "--port", str(port), "--max-seconds", str(MAX_SECONDS)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for(url, server)
        yield dict(
            url=url,
            checkpoint=checkpoint,
            videos=videos,
            bad=bad,
            server=server,
            index=index,
            uploads=uploads,
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"avsync app exited ({server.returncode}):\n{server.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"avsync app did not answer at {url} in {timeout} s")


@pytest.fixture
def browser():
    drivers = []

    def start():
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


# ---------------------------------------------------------------------------------------------- helpers
def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def table_rows(driver, element_id: str, count: int) -> list[str] | None:
    """The text of the data rows of a Gradio table once `count` of them show."""
    from selenium.webdriver.common.by import By

    rows = [row.text for row in by_id(driver, element_id).find_elements(By.CSS_SELECTOR, "[role=row]")]
    rows = [row.replace("\n", " ") for row in rows[1:] if row.strip()]  # the first is the header
    return rows if len(rows) >= count else None


def open_tab(driver, title: str) -> None:
    from selenium.webdriver.common.by import By

    buttons = driver.find_elements(By.XPATH, f"//button[@role='tab' and contains(., '{title}')]")
    driver.execute_script("arguments[0].click();", buttons[0])


def upload(driver, url: str, path: Path) -> str:
    """Open the page, upload `path`, wait for the status line; returns it."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), 60)
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))
    return _until(lambda: _status(driver), 240)


def _status(driver) -> str | None:
    text = by_id(driver, "status").text
    return text if ("Analysed" in text or "Cannot" in text or "went wrong" in text) else None


def _until(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError("the page did not show the expected result in time")


def image_at(driver, element_id: str, previous: str | None = None) -> tuple[str, np.ndarray]:
    """(src, pixels) of the image shown in `element_id` (waiting for one other than `previous`)."""
    from selenium.webdriver.common.by import By

    def source():
        found = [e.get_attribute("src") for e in driver.find_elements(By.CSS_SELECTOR, f"#{element_id} img")]
        return next((s for s in found if s and s != previous), None)

    src = _until(source, 120)
    with urllib.request.urlopen(src, timeout=30) as response:
        return src, np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


# ---------------------------------------------------------------------------------------------- tests
def test_an_uploaded_clip_shows_maps_segments_and_search_results(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from avsync.api import load
    from avsync.app.analysis import MAP_KINDS, analyze
    from avsync.app.render import frame_strip, heat_overlay

    driver = browser()
    clip = served["videos"][1]
    status = upload(driver, served["url"], clip)
    assert status.startswith(f"Analysed {clip.stem}"), status

    # the overlay video and the frame strip; the strip is the frames with the map laid over them
    video = _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#overlay-video video"), 60)[0]
    assert video.get_attribute("src")
    src, strip = image_at(driver, "strip")
    analysis = analyze(load(str(served["checkpoint"]), "cpu"), clip)
    paper = list(MAP_KINDS)[0]
    maps = analysis.maps(paper)
    expected = np.asarray(frame_strip(heat_overlay(analysis.frames, maps), analysis.frame_times, columns=4))
    assert strip.shape == expected.shape
    assert np.abs(strip.astype(int) - expected.astype(int)).max() <= 2  # the served picture is ours
    # where the map of frame 0 is hottest the overlay is reddest, where it is coldest bluest
    overlay, frame = heat_overlay(analysis.frames, maps)[0].astype(int), analysis.frames[0].astype(int)
    size = frame.shape[0]
    grid = torch.from_numpy(maps[:1, None].astype(np.float32))
    upsampled = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear")[0, 0].numpy()
    hot, cold = upsampled >= np.quantile(upsampled, 0.9), upsampled <= np.quantile(upsampled, 0.1)
    red_gain, blue_gain = overlay[..., 0] - frame[..., 0], overlay[..., 2] - frame[..., 2]
    assert red_gain[hot].mean() > red_gain[cold].mean() + 20
    assert blue_gain[cold].mean() > blue_gain[hot].mean() + 20

    # the control: the maps change when the frames are prompted with another clip's sound
    checkbox = by_id(driver, "control").find_element(By.CSS_SELECTOR, "input[type=checkbox]")
    driver.execute_script("arguments[0].click();", checkbox)
    _until(lambda: "control" in by_id(driver, "map-caption").text, 120)
    _, controlled = image_at(driver, "strip", previous=src)
    assert np.abs(controlled.astype(int) - strip.astype(int)).mean() > 1

    # what happens when: the segmentation figure, the events and the boundary scores
    open_tab(driver, "What happens when")
    _, figure = image_at(driver, "segments")
    assert figure.shape[0] > 200 and figure.shape[1] > 600
    assert "audio-visual segments" in by_id(driver, "segments-text").text
    rows = _until(lambda: table_rows(driver, "boundaries", 15), 60)
    assert rows[0].split()[0] == f"{analysis.frame_times[1]:.2f}".rstrip("0").rstrip(".")

    # clips that sound alike: the top results, the clip itself first, with playable previews
    open_tab(driver, "Clips that sound alike")
    rows = _until(lambda: table_rows(driver, "hits", 5), 60)
    from avsync.search.index import SearchIndex

    index = SearchIndex(served["index"])
    (hits,) = index.search(index.check_query(analysis.audio_tokens, "query"), "audio", 10)
    assert rows == [f"{e['rank']} {e['clip']} {round(e['score'], 4):g}" for e in hits.to_json()]
    previews = by_id(driver, "previews").find_elements(By.TAG_NAME, "video")
    assert len(previews) == 5
    with urllib.request.urlopen(previews[0].get_attribute("src"), timeout=30) as response:
        assert response.read() == (clip.parent / f"{rows[0].split()[1]}.mp4").read_bytes()

    driver.save_screenshot(str(tmp_path / "app.png"))
    if os.environ.get("AVSYNC_UPDATE_SCREENSHOT"):
        open_tab(driver, "Where is the sound")
        time.sleep(1)
        driver.save_screenshot(str(ROOT / "docs" / "app.png"))


BAD_INPUTS = {
    "notes.mp4": "not a video the app can read",
    "silent.mp4": "has no audio track",
    "half_second.mp4": "lasts 0.50 s; the model needs at least 2 s",
}


def test_bad_inputs_get_a_message_in_the_page_and_the_server_keeps_serving(served, browser):
    driver = browser()
    for name, message in BAD_INPUTS.items():
        status = upload(driver, served["url"], served["bad"] / name)
        assert status.startswith("Cannot analyse this file.") and message in status, status
        assert "Traceback" not in driver.page_source
    status = upload(driver, served["url"], served["bad"] / "thirty_minutes.mkv")
    assert re.search(
        rf"Analysed thirty_minutes: 1800\.\d s long: the first {MAX_SECONDS:g} s are analysed", status
    )
    status = upload(driver, served["url"], served["bad"] / "uhd.mp4")
    assert status.startswith("Analysed uhd"), status
    assert served["server"].poll() is None
    status = upload(driver, served["url"], served["videos"][0])  # and a good clip still works after them
    assert status.startswith("Analysed"), status
    uploaded = served["videos"][0].read_bytes()
    kept = [p for p in served["uploads"].rglob("*") if p.is_file() and p.stat().st_size == len(uploaded)]
    assert not [p for p in kept if p.read_bytes() == uploaded], "an upload was kept after its analysis"


def test_four_browser_sessions_at_once(served, browser):
    drivers = [browser() for _ in range(4)]
    results: dict[int, str] = {}

    def session(i: int) -> None:
        results[i] = upload(drivers[i], served["url"], served["videos"][i])

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=400)
    assert sorted(results) == [0, 1, 2, 3]
    for i, status in results.items():
        assert status.startswith(f"Analysed {served['videos'][i].stem}"), status


def test_the_server_binds_to_loopback_by_default():
    from avsync.tools import parse

    assert parse("app", ["--ckpt", "x"]).host == "127.0.0.1"
