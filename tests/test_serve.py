"""amrg serve: the page's function, its API through gradio_client, and the page in a real headless browser."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="amrg serve needs the serve extra (make setup installs it)")

from gradio_client import Client, handle_file  # noqa: E402

from amrg.data.synthetic import render_study  # noqa: E402
from amrg.inference import Predictor, load  # noqa: E402
from amrg.labels import LABELS  # noqa: E402
from amrg.serve import API_NAME, RECALLED_COLUMNS, build_app, report_outputs, serve  # noqa: E402
from tests.checkpoints.test_stage2 import build, save, stage2_files  # noqa: E402
from tests.data.test_dicom import write_dicom  # noqa: E402

DECODE = {"max_new_tokens": 5, "num_beams": 1}
BROWSER_TIMEOUT = 60  # seconds for the page to load and answer (a cold Chromium on 2 shared cores)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve_ckpt")
    return save(build(stage2_files(root)), root / "stage2.ckpt")


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return load(checkpoint)


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two views of a synthetic study (PNG, and the second also as DICOM) and a file that is no image."""
    root = tmp_path_factory.mktemp("films")
    study = render_study(np.random.default_rng(0), 64, 2)
    out = {}
    for v, image in enumerate(study.images):
        Image.fromarray(image).save(root / f"film{v}.png")
        out[f"png{v}"] = root / f"film{v}.png"
    out["dicom"] = write_dicom(root / "lateral.dcm", study.images[1].astype(np.uint16) * 16, bits_stored=12)
    out["bad"] = root / "notes.png"
    out["bad"].write_text("not an image")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(predictor: Predictor) -> Iterator[str]:
    from amrg.serve import _theme

    app = build_app(predictor, top_k=2, **DECODE)
    port = _free_port()
    app.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        ssr_mode=False,
        quiet=True,
        theme=_theme(),
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_the_page_function_gives_report_probabilities_overlays_and_memory(
    predictor: Predictor, films
) -> None:
    message, report, probabilities, overlays, patches, recalled = report_outputs(
        predictor, [films["png0"], films["dicom"]], top_k=2, **DECODE
    )
    expected = predictor.predict([films["png0"], films["dicom"]], top_k=2, cam_labels=3, **DECODE)
    assert message.startswith("Read 2 view(s): film0.png, lateral.dcm. Predicted labels: ")
    assert report == expected.report and list(probabilities) == list(LABELS)
    assert probabilities["Edema"] == pytest.approx(expected.probabilities["Edema"], abs=1e-4)
    assert len(overlays) == 2 * len(expected.cams)  # every explained label on both views
    assert overlays[0][0].shape == (64, 64, 3) and overlays[0][1].startswith("view 0: ")
    assert len(patches) == 2 and patches[0][0].ndim == 3  # the visual items, drawn with their boxes
    assert recalled["headers"] == RECALLED_COLUMNS
    assert [row[0] for row in recalled["data"]] == ["visual", "visual", "report", "report"]


def test_a_bad_upload_gives_a_message_not_an_error(predictor: Predictor, films) -> None:
    message, report, probabilities, overlays, patches, recalled = report_outputs(
        predictor, [films["bad"], None], **DECODE
    )
    assert message.startswith("**Cannot read the upload:** image notes.png is unreadable or corrupt")
    assert str(films["bad"].parent) not in message  # the server's folder is not shown
    assert (report, probabilities, overlays, patches, recalled["data"]) == ("", {}, [], [], [])
    assert report_outputs(predictor, [None, None])[0] == "Upload a view first: PNG, JPEG or DICOM."


def test_the_api_answers_through_gradio_client(url: str, predictor: Predictor, films, tmp_path: Path) -> None:
    client = Client(url, verbose=False, download_files=str(tmp_path))
    assert list(client.view_api(return_format="dict", print_info=False)["named_endpoints"]) == [
        f"/{API_NAME}"
    ]
    message, report, label, overlays, patches, recalled = client.predict(
        handle_file(str(films["png0"])), handle_file(str(films["png1"])), api_name=f"/{API_NAME}"
    )
    expected = predictor.predict([films["png0"], films["png1"]], top_k=2, cam_labels=3, **DECODE)
    assert message.startswith("Read 2 view(s): film0.png, film1.png.") and report == expected.report
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(confidences) == set(LABELS)
    assert confidences["Cardiomegaly"] == pytest.approx(expected.probabilities["Cardiomegaly"], abs=1e-4)
    assert len(overlays) == 2 * len(expected.cams) and Path(overlays[0]["image"]).is_file()
    assert [p["caption"].split(" w=")[0] for p in patches] == [i.label for i in expected.recalled[:2]]
    assert len(recalled["data"]) == 4
    bad = client.predict(handle_file(str(films["bad"])), None, api_name=f"/{API_NAME}")
    assert bad[0].startswith("**Cannot read the upload:**") and bad[1] == ""


def test_serve_loads_the_model_once_and_launches_offline(checkpoint: Path, monkeypatch) -> None:
    import gradio as gr

    import amrg.inference

    loads, launches = [], []
    real = amrg.inference.load
    monkeypatch.setattr(amrg.inference, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launches.append(kw))
    serve(checkpoint, port=7999, max_new_tokens=5)
    assert len(loads) == 1 and len(launches) == 1
    assert launches[0]["server_port"] == 7999 and launches[0]["ssr_mode"] is False
    assert launches[0]["share"] is False and launches[0]["server_name"] == "127.0.0.1"


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless browser: install the OS packages chromium and chromium-driver (see .ci/run)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_a_browser_uploads_a_film_and_reads_the_report(url: str, predictor: Predictor, films) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, BROWSER_TIMEOUT)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#view1 input[type=file]")))
        upload.send_keys(str(films["png0"]))
        wait.until(ec.text_to_be_present_in_element((By.ID, "view1"), "film0"))  # shown as "film0", ".png"
        browser.find_element(By.ID, "run").click()
        report = browser.find_element(By.CSS_SELECTOR, "#report textarea")
        wait.until(lambda _: report.get_attribute("value"))
        expected = predictor.predict(films["png0"], top_k=2, cam_labels=3, **DECODE)
        assert report.get_attribute("value") == expected.report
        assert "Read 1 view(s): film0.png" in browser.find_element(By.ID, "message").text
        assert expected.predicted()[0] in browser.find_element(By.ID, "probabilities").text
        assert browser.find_elements(By.CSS_SELECTOR, "#overlays img")  # the Grad-CAM overlays are shown

        # a file that is no image: a message on the same page, which keeps working
        browser.get(url)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#view1 input[type=file]")))
        upload.send_keys(str(films["bad"]))
        wait.until(ec.text_to_be_present_in_element((By.ID, "view1"), "notes"))
        browser.find_element(By.ID, "run").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "Cannot read the upload"))
        assert "image notes.png is unreadable or corrupt" in browser.find_element(By.ID, "message").text
    finally:
        browser.quit()
