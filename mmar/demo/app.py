"""The demo page (Gradio): tabs for text-to-image, captioning and, for video checkpoints, text-to-video.

The buttons call mmar/demo/handlers.py; errors come back as a message in the tab's status line. Nothing here
reaches the network (analytics off, no share link); the page is served from this machine only by default.
"""
from __future__ import annotations

import os
import threading

from PIL import Image

from mmar.demo import handlers
from mmar.pipeline import Pipeline

SHOW = 224  # drawn images are enlarged (nearest neighbour) to about this many pixels for the page


def _enlarge(img: Image.Image) -> Image.Image:
    k = max(1, SHOW // max(img.size))
    return img.resize((img.width * k, img.height * k), Image.NEAREST) if k > 1 else img


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("the web demo needs gradio: run `make demo-deps` "
                          "(or pip install -e '.[demo]' && pip install --no-deps gradio==6.31.0)") from None
    return gr


def build(pipe: Pipeline, title: str = "mmar"):
    """The Gradio Blocks app for one loaded pipeline (not launched)."""
    gr = _gradio()
    lock = threading.Lock()  # one model, one request at a time

    def gr_progress(progress):
        return lambda done, total: progress(done / max(total, 1), desc=f"drawing: step {done} of {total}")

    def t2i(prompt, n, cfg, temperature, seed, progress=gr.Progress()):
        with lock:
            items, status = handlers.draw_images(pipe, prompt, n, cfg, temperature, seed, gr_progress(progress))
        return [(_enlarge(img), label) for img, label in items], status

    def cap(path):
        with lock:
            caption, status = handlers.caption_image(pipe, path)
        if status.startswith("error"):  # name the user's file, not the server's upload folder
            return None, caption, status.replace(str(path), os.path.basename(str(path))) if path else status
        return _enlarge(handlers.model_view(pipe, path)), caption, status

    def t2v(prompt, n, cfg, temperature, seed, fps, progress=gr.Progress()):
        with lock:
            return handlers.draw_videos(pipe, prompt, n, cfg, temperature, seed, fps, gr_progress(progress))

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\n{pipe!r}")
        with gr.Tabs():
            if not pipe.can_make_video:
                with gr.Tab("Text to image", elem_id="tab-t2i"):
                    with gr.Row():
                        with gr.Column():
                            prompt = gr.Textbox(label="Prompt (one per line for several)", lines=2,
                                                placeholder="a handwritten 7", elem_id="t2i-prompt")
                            n = gr.Slider(1, handlers.MAX_IMAGES, value=4, step=1, label="Images per prompt",
                                          elem_id="t2i-n")
                            cfg = gr.Slider(0, 10, value=pipe.sampling.cfg, step=0.5, label="Guidance (CFG scale, 1 = off)",
                                            elem_id="t2i-cfg")
                            temp = gr.Slider(0, 2, value=pipe.sampling.temperature, step=0.05, label="Temperature", elem_id="t2i-temperature")
                            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="t2i-seed")
                            go = gr.Button("Draw", variant="primary", elem_id="t2i-draw")
                        with gr.Column():
                            status = gr.Markdown("", elem_id="t2i-status")
                            gallery = gr.Gallery(label="Images", columns=4, elem_id="t2i-gallery")
                    go.click(t2i, [prompt, n, cfg, temp, seed], [gallery, status])
            if pipe.can_caption:
                with gr.Tab("Caption an image", elem_id="tab-caption"):
                    with gr.Row():
                        with gr.Column():
                            # a file input, not gr.Image: gr.Image decodes the upload itself and answers a file
                            # that is not an image with a bare "Error"; here our handler names the problem
                            upload = gr.File(label="Upload or drop an image (PNG, JPEG, BMP, WebP; any size)",
                                             file_types=["image"], type="filepath", elem_id="caption-file")
                            go_c = gr.Button("Caption", variant="primary", elem_id="caption-go")
                        with gr.Column():
                            seen = gr.Image(label="What the model sees (converted and resized as trained)",
                                            interactive=False, elem_id="caption-seen", height=240)
                            text = gr.Textbox(label="Caption", interactive=False, elem_id="caption-text")
                            status_c = gr.Markdown("", elem_id="caption-status")
                    go_c.click(cap, [upload], [seen, text, status_c])
            if pipe.can_make_video:
                with gr.Tab("Text to video", elem_id="tab-t2v"):
                    with gr.Row():
                        with gr.Column():
                            vprompt = gr.Textbox(label="Prompt (one per line for several)", lines=2,
                                                 elem_id="t2v-prompt")
                            vn = gr.Slider(1, 4, value=1, step=1, label="Videos per prompt", elem_id="t2v-n")
                            vcfg = gr.Slider(0, 10, value=pipe.sampling.cfg, step=0.5, label="Guidance (CFG scale, 1 = off)")
                            vtemp = gr.Slider(0, 2, value=pipe.sampling.temperature, step=0.05, label="Temperature")
                            vseed = gr.Number(value=0, precision=0, label="Seed")
                            fps = gr.Slider(1, 30, value=8, step=1, label="Frames per second")
                            go_v = gr.Button("Draw video", variant="primary", elem_id="t2v-draw")
                        with gr.Column():
                            vstatus = gr.Markdown("", elem_id="t2v-status")
                            vgallery = gr.Gallery(label="Videos (animated GIF)", columns=2, elem_id="t2v-gallery")
                    go_v.click(t2v, [vprompt, vn, vcfg, vtemp, vseed, fps], [vgallery, vstatus])
    return app


def serve(ckpt: str, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu", int8: bool = False) -> None:
    """Load the checkpoint, then serve the page until interrupted."""
    gr = _gradio()  # fail early, before loading the model, when gradio is missing
    pipe = Pipeline.from_pretrained(ckpt, device=device, int8=int8)
    app = build(pipe, title=f"mmar: {os.path.basename(os.path.normpath(str(ckpt)))}")
    print(f"mmar demo: serving {ckpt} at http://{host}:{port} (Ctrl+C to stop)", flush=True)
    app.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=False,
                                                  inbrowser=False, show_error=False, quiet=True)
    del gr
