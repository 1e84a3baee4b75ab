"""``amrg serve CKPT``: a web demo of a checkpoint (Gradio).

Upload one or two views of a study (PNG, JPEG, DICOM, ...) and get, from one
:meth:`amrg.inference.Predictor.predict` call: the generated report (stage 2), the label probabilities,
the Grad-CAM overlays of the top predicted labels on each view, and the recalled memory (visual patches
drawn on their source images with their boxes, reports with their weights). The model is loaded once,
when the app is built; a view that cannot be read gives a message on the page, never an error page.

The same function backs the page and the API (``api_name="report"``): with ``gradio_client``,
``Client(url).predict(handle_file("view.png"), None, api_name="/report")`` returns the message, the report,
the probabilities, the overlays, the recalled patches and the recalled-items table.

Needs the ``serve`` extra (``pip install 'amrg[serve]'``). Nothing is fetched from the network: analytics
are off and the theme uses the system fonts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amrg.labels import LABELS

if TYPE_CHECKING:  # pragma: no cover
    import gradio as gr

    from amrg.inference import Predictor, StudyPrediction

__all__ = ["API_NAME", "RECALLED_COLUMNS", "build_app", "report_outputs", "serve"]

_logger = logging.getLogger(__name__)

API_NAME = "report"
RECALLED_COLUMNS = ["memory", "labels", "weight", "source", "view", "box", "text"]
_UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"]
_INTRO = (
    "Upload one or two views of a chest X-ray study (PNG, JPEG or DICOM) and press **Write report**. "
    "The page shows what the model wrote, the stage-1 label probabilities, Grad-CAM maps of the top "
    "predicted labels on each view, and the memory items the report's visual prefix recalled most."
)


def _empty(message: str) -> tuple[Any, ...]:
    return message, "", {}, [], [], {"headers": RECALLED_COLUMNS, "data": []}


def _gallery(prediction: StudyPrediction, memory_root: Path | None) -> tuple[list, list]:
    from amrg.figures import cam_overlay, patch_picture

    overlays = []
    for label, maps in prediction.cams.items():
        for v, view in enumerate(prediction.views):
            overlays.append(
                (cam_overlay(view, maps[v]), f"view {v}: {label} ({prediction.probabilities[label]:.2f})")
            )
    patches = []
    for item in prediction.recalled:
        if item.memory == "visual":
            where = f"{item.source_id}" + (f" view {item.view}" if item.view is not None else "")
            patches.append((patch_picture(item, memory_root), f"{item.label} w={item.weight:.3f} · {where}"))
    return overlays, patches


def report_outputs(
    predictor: Predictor, paths: Sequence[str | os.PathLike | None], top_k: int = 5, **decoding: Any
) -> tuple[Any, ...]:
    """What the page shows for uploaded views (the function behind the button and the API).

    Args:
        predictor: the loaded model.
        paths: the uploaded files (None where nothing was uploaded).
        top_k: recalled items per memory.
        **decoding: stage-2 decoding overrides.

    Returns:
        ``(message, report, probabilities {label: p}, overlays [(image, caption)], patches [(image,
        caption)], recalled {"headers", "data"})``; on a bad upload only the message is filled in.
    """
    from amrg.data.images import image_problem

    given = [Path(p) for p in paths if p]
    if not given:
        return _empty("Upload a view first: PNG, JPEG or DICOM.")
    # name the uploaded file, not the server's temp folder it was saved in
    problems = [
        problem.replace(f"{path.parent}{os.sep}", "")
        for path in given
        if (problem := image_problem(path, decode=True)) is not None
    ]
    if problems:
        return _empty("**Cannot read the upload:** " + "; ".join(problems))
    try:
        prediction = predictor.predict(given, id=given[0].stem, top_k=top_k, cam_labels=3, **decoding)
    except Exception as err:  # the page's boundary: a message, never an error page
        _logger.exception("prediction failed for %s", [str(p) for p in given])
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return _empty(f"**Prediction failed:** {first}")
    overlays, patches = _gallery(prediction, predictor.memory_image_root)
    rows = [
        [
            item.memory,
            ", ".join(item.all_labels),
            round(item.weight, 4),
            item.source_id,
            "" if item.view is None else item.view,
            "" if item.box is None else ", ".join(f"{v:g}" for v in item.box),
            item.text or "",
        ]
        for item in prediction.recalled
    ]
    predicted = ", ".join(prediction.predicted()) or "none above 0.5"
    names = ", ".join(p.name for p in given)
    message = f"Read {len(given)} view(s): {names}. Predicted labels: {predicted}."
    report = prediction.report if prediction.report is not None else "(a stage-1 checkpoint writes no report)"
    probabilities = {label: round(prediction.probabilities[label], 4) for label in LABELS}
    return message, report, probabilities, overlays, patches, {"headers": RECALLED_COLUMNS, "data": rows}


def build_app(predictor: Predictor, top_k: int = 5, **decoding: Any) -> gr.Blocks:
    """The Gradio page for a loaded model.

    Args:
        predictor: the model, loaded once (``amrg.load``).
        top_k: recalled items per memory shown.
        **decoding: stage-2 decoding overrides (``num_beams``, ``max_new_tokens``, ...).

    Returns:
        The (not yet launched) ``gr.Blocks``.
    """
    import gradio as gr

    def run(view1: str | None, view2: str | None) -> tuple[Any, ...]:
        return report_outputs(predictor, [view1, view2], top_k, **decoding)

    stage = "report generator (stage 2)" if predictor.stage == 2 else "disease classifier (stage 1)"
    checkpoint = predictor.checkpoint.name if predictor.checkpoint is not None else "in memory"
    with gr.Blocks(title="amrg: look inside a checkpoint", analytics_enabled=False) as app:
        gr.Markdown(f"## amrg: {stage}\n`{checkpoint}` · {_INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                view1 = gr.File(label="View 1 (e.g. frontal)", file_types=_UPLOAD_TYPES, elem_id="view1")
                view2 = gr.File(
                    label="View 2 (optional, e.g. lateral)", file_types=_UPLOAD_TYPES, elem_id="view2"
                )
                button = gr.Button("Write report", variant="primary", elem_id="run")
                message = gr.Markdown(elem_id="message")
            with gr.Column(scale=2):
                report = gr.Textbox(label="Generated report", lines=6, elem_id="report")
                probabilities = gr.Label(
                    label="Label probabilities (stage-1 head)",
                    num_top_classes=len(LABELS),
                    elem_id="probabilities",
                )
        overlays = gr.Gallery(
            label="Grad-CAM of the top predicted labels",
            columns=4,
            height=340,
            object_fit="contain",
            format="png",
            elem_id="overlays",
        )
        patches = gr.Gallery(
            label="Recalled visual memory (patch boxes in red)",
            columns=5,
            height=280,
            object_fit="contain",
            format="png",
            elem_id="patches",
        )
        recalled = gr.Dataframe(
            headers=RECALLED_COLUMNS,
            label="Recalled memory items",
            wrap=True,
            column_widths=["8%", "14%", "8%", "12%", "6%", "12%", "40%"],
            elem_id="recalled",
        )
        button.click(
            run,
            inputs=[view1, view2],
            outputs=[message, report, probabilities, overlays, patches, recalled],
            api_name=API_NAME,
        )
    return app


def _theme() -> Any:
    import gradio as gr

    # the default theme loads Google fonts; the system's keep the page offline
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def serve(
    checkpoint: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    llm_path: Path | None = None,
    trust_remote_code: bool = False,
    memory_image_root: Path | None = None,
    top_k: int = 5,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    share: bool = False,
) -> None:
    """Serve a web demo of a stage-1 or stage-2 checkpoint until interrupted (Ctrl-C).

    Args:
        checkpoint: the ``.ckpt`` written by ``amrg fit`` (stage 2 writes reports; stage 1 gives
            probabilities and Grad-CAM maps only).
        host: address to listen on (``0.0.0.0`` for every interface).
        port: port to listen on.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        llm_path: the base LLM's folder, when it is not where it was at training time.
        trust_remote_code: allow model code shipped in the LLM folder.
        memory_image_root: the visual memory's image folder, when it moved since the memory was built.
        top_k: recalled items per memory shown.
        num_beams: override of the checkpoint's beam width.
        max_new_tokens: override of the checkpoint's maximum report length in tokens.
        share: also open a public Gradio share link (needs the internet; off by default).
    """
    from amrg.inference import load

    try:
        import gradio  # noqa: F401 - fail early, before the model loads
    except ImportError:
        raise ImportError("amrg serve needs Gradio: pip install 'amrg[serve]'") from None
    predictor = load(
        checkpoint,
        device=device,
        llm_path=llm_path,
        trust_remote_code=trust_remote_code,
        memory_image_root=memory_image_root,
    )
    decoding = {"num_beams": num_beams, "max_new_tokens": max_new_tokens}
    if predictor.stage == 1 and any(v is not None for v in decoding.values()):
        raise ValueError(
            f"checkpoint '{checkpoint}' is a stage-1 classifier: it writes no report, so --num_beams and "
            "--max_new_tokens do not apply"
        )
    app = build_app(predictor, top_k, **decoding)
    _logger.info("serving %r on http://%s:%d", predictor, host, port)
    app.launch(server_name=host, server_port=port, share=share, ssr_mode=False, theme=_theme(), quiet=False)
