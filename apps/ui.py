"""The Gradio app: Chat, Assemble and Plugins tabs wired to the handlers in this package.

Only layout and event wiring live here; what each event does is in `chat`, `models`,
`assemble` and `catalog`, which are tested without a browser. Every handler turns an
`MMHubError` into a message in the page (a status line and a toast) and returns, so a
bad upload or spec never stops the server.
"""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from mmhub.apps import assemble, catalog, chat
from mmhub.apps.models import DEFAULT, LoadedModel, ModelPool, model_choices
from mmhub.apps.uploads import AUDIO_SUFFIXES, Limits
from mmhub.errors import MMHubError

DEFAULT_LIMITS = Limits()  # frozen: one shared default is safe
TEMPLATES = ["auto", "plain", "vicuna_v1", "llama-2", "chatml", "tokenizer"]


def _file_types(loaded: LoadedModel) -> list[str]:
    types = []
    if "image" in loaded.modalities:
        types.append("image")
    if "audio" in loaded.modalities:
        types += sorted(AUDIO_SUFFIXES)
    return types


def _input_box(loaded: LoadedModel | None) -> dict[str, Any]:
    """MultimodalTextbox settings for a model: upload only the modalities it reads."""
    types = _file_types(loaded) if loaded else []
    takes = ", ".join(types) if types else "text only"
    return dict(file_types=types or None, sources=["upload"] if types else [], interactive=True,
                placeholder=f"Ask something (attach: {takes}); Enter sends" if types else
                "Ask something (this model reads text only); Enter sends")


def build_app(pool: ModelPool, limits: Limits = DEFAULT_LIMITS, folders: list[str] | None = None,
              initial: str = DEFAULT, runs_dir: str = "runs") -> gr.Blocks:
    """The demo's Blocks; `pool` serves the models, `initial` is each new session's model key; the Train and Runs
    tabs work in `runs_dir`."""
    choices = model_choices(folders)
    keys = [k for _, k in choices]
    if initial not in keys:
        choices.insert(0, (initial, initial))

    def current(key: str) -> LoadedModel:
        return pool.get(key)

    from pathlib import Path

    from mmhub.apps.train_runs import TrainRunner

    runner = TrainRunner(Path(runs_dir))
    with gr.Blocks(title="mmhub demo", analytics_enabled=False) as app:
        key = gr.State(initial)
        turns = gr.State([])
        gr.Markdown("# mmhub\nChat with a trained multimodal model, assemble a spec from the registered "
                    "components, and browse the plugins that provide them.")
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    model_dd = gr.Dropdown(choices=choices, value=initial, label="Model", scale=3,
                                           elem_id="model-select")
                    folder = gr.Textbox(label="…or a local model folder", placeholder="runs/NAME/STAGE/model", scale=3)
                    folder_btn = gr.Button("Load folder", scale=1)
                note = gr.Markdown(elem_id="model-note")
                bot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot")
                box = gr.MultimodalTextbox(file_count="multiple", sources=["upload"], elem_id="chat-input",
                                           show_label=False, placeholder="Ask something; Enter sends")
                status = gr.Markdown(elem_id="chat-status")
                with gr.Row():
                    undo_btn = gr.Button("Undo last exchange")
                    clear_btn = gr.Button("Clear")
                with gr.Accordion("Generation settings", open=False):
                    max_new = gr.Slider(1, 512, value=64, step=1, label="max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
            with gr.Tab("Assemble", id="assemble"):
                assembled = _assemble_tab()
            with gr.Tab("Train", id="train"):
                _train_tab(runner, assembled)
            with gr.Tab("Runs", id="runs"):
                chat_with, chat_with_path = _runs_tab(runner, pool)
            with gr.Tab("Plugins", id="plugins"):
                gr.Markdown(catalog.summary(), elem_id="plugins-summary")
                # datasets and eval tasks get their own table: the browser renders only a long table's visible rows
                rows = catalog.component_rows()
                data_kinds = ("dataset", "eval task")
                gr.Dataframe(value=[r for r in rows if r[0] not in data_kinds], headers=catalog.COMPONENT_COLUMNS,
                             wrap=True, interactive=False, label="Registered components", elem_id="components-table",
                             show_search="search")  # a long list: the search box finds a component by any column
                gr.Dataframe(value=[r for r in rows if r[0] in data_kinds], headers=catalog.COMPONENT_COLUMNS,
                             wrap=True, interactive=False, label="Datasets and eval tasks", elem_id="data-table")
                gr.Dataframe(value=catalog.plugin_rows(), headers=catalog.PLUGIN_COLUMNS, interactive=False,
                             label="Plugins loaded")
                failed = catalog.failed_rows()
                gr.Dataframe(value=failed or [["-", "-", "none failed"]], headers=catalog.FAILED_COLUMNS,
                             interactive=False, label="Plugins that failed to load", elem_id="failed-table")

        def show_model(k: str) -> tuple[Any, ...]:
            try:
                loaded = current(k)
            except MMHubError as exc:
                gr.Warning(str(exc))
                return k, f"**Could not load {k}**: {exc}", gr.update(), [], [], ""
            return k, loaded.note, gr.update(**_input_box(loaded)), [], [], ""

        def load_folder(path: str) -> tuple[Any, ...]:
            path = (path or "").strip()
            if not path:
                return (gr.update(), gr.update(), gr.update(), gr.update(), gr.update(),
                        "type the path of a model folder first")
            return show_model(f"folder:{path}")

        outs = [key, note, box, bot, turns, status]
        app.load(show_model, [key], outs)
        model_dd.change(show_model, [model_dd], outs)
        folder_btn.click(load_folder, [folder], outs)
        chat_with.click(lambda path: (path, gr.Tabs(selected="chat")), [chat_with_path], [folder, tabs]).then(
            load_folder, [folder], outs)

        def submit(message: dict[str, Any], k: str, history: list[chat.Turn]) -> tuple[Any, ...]:
            message = message or {}
            try:
                turn = chat.user_turn(message.get("text", ""), message.get("files"), current(k), limits)
            except MMHubError as exc:
                gr.Warning(str(exc))
                return gr.update(), history, chat.render(history), f"⚠️ {exc}"
            history = history + [turn]
            return gr.update(value=None), history, chat.render(history), ""

        def respond(k: str, history: list[chat.Turn], n: float, t: float, p: float) -> Iterator[tuple[Any, ...]]:
            if not history or history[-1].role != "user":  # the message was refused in `submit`: leave all as is
                yield gr.update(), gr.update(), gr.update()
                return
            answer = chat.Turn("assistant", "")
            history = history + [answer]
            yield history, chat.render(history), "_generating…_"
            try:
                for part in chat.reply(history[:-1], current(k), chat.Settings(int(n), float(t), float(p))):
                    answer.text = part.text
                    saved = chat.save_media(part.media)  # what the model's generators drew
                    answer.files, answer.originals = saved.shown, saved.originals
                    yield history, chat.render(history), "_generating…_"
            except MMHubError as exc:
                history = history[:-1]
                gr.Warning(str(exc))
                yield history, chat.render(history), f"⚠️ {exc}"
                return
            yield history, chat.render(history), ""

        # replies run concurrently: the model's engine batches them (mmhub.serve.engine) and queues the rest
        box.submit(submit, [box, key, turns], [box, turns, bot, status], concurrency_limit=None).then(
            respond, [key, turns, max_new, temperature, top_p], [turns, bot, status], concurrency_id="generate",
            concurrency_limit=16)
        undo_btn.click(lambda h: (chat.undo(h), chat.render(chat.undo(h)), ""), [turns], [turns, bot, status])
        clear_btn.click(lambda: ([], [], ""), None, [turns, bot, status])
        bot.clear(lambda: ([], ""), None, [turns, status])  # the chat's own trash button
    return app


def _path(upload: Any) -> str:
    """A gr.File value's path on the server (a path string, or an object with ``.name`` / ``.path``)."""
    return str(getattr(upload, "path", None) or getattr(upload, "name", None) or upload)


def _train_tab(runner: Any, assembled: Any) -> None:
    from pathlib import Path

    from mmhub.apps import train_data, train_runs

    with gr.Row():
        source = gr.Dropdown(choices=_recipe_and_preset_keys(), label="start from a recipe or preset", scale=3,
                             elem_id="train-source")
        load_btn = gr.Button("Load its spec", scale=1, elem_id="train-load")
        from_assemble = gr.Button("Use the Assemble tab's spec", scale=1, elem_id="train-from-assemble")
        spec_upload = gr.File(label="…or a spec file (.yaml, .json)", file_types=[".yaml", ".yml", ".json"], scale=1,
                              elem_id="train-spec-file")
    spec = gr.Code(language="yaml", label="spec with its stages (edit learning rate, steps, batch, LoRA rank, what "
                                          "trains, data)", interactive=True, lines=14, elem_id="train-spec")
    with gr.Accordion("Data and stage settings (written into the spec above)", open=True):
        with gr.Row():
            stage_box = gr.Textbox(label="stage (empty: every stage)", scale=1, elem_id="train-stage")
            dataset_dd = gr.Dropdown(choices=train_data.dataset_names(), label="a registered dataset", scale=2,
                                     elem_id="train-dataset")
            use_dataset = gr.Button("Use this dataset", scale=1)
        with gr.Row():
            data_file = gr.File(label="…or upload LLaVA-JSON / ShareGPT (.json, .jsonl)",
                                file_types=[".json", ".jsonl"], scale=2, elem_id="train-data-file")
            media_zip = gr.File(label="its images as a .zip", file_types=[".zip"], scale=2, elem_id="train-media-zip")
            upload_name = gr.Textbox(label="upload name", scale=1, elem_id="train-upload-name")
            upload_btn = gr.Button("Upload and use", scale=1, elem_id="train-upload")
        with gr.Row():
            lr = gr.Number(label="learning rate", value=None, scale=1)
            steps = gr.Number(label="max steps", value=None, precision=0, scale=1, elem_id="train-steps")
            batch = gr.Number(label="batch size", value=None, precision=0, scale=1)
            rank = gr.Number(label="LoRA rank", value=None, precision=0, scale=1)
            apply_btn = gr.Button("Apply settings", scale=1, elem_id="train-apply")
            check_btn = gr.Button("Check data (pre-flight)", scale=1, elem_id="train-check")
    with gr.Row():
        name = gr.Textbox(label="run name (a folder in the runs directory)", scale=3, elem_id="train-name")
        start_btn = gr.Button("Start", variant="primary", scale=1, elem_id="train-start")
    with gr.Row():
        run_dd = gr.Dropdown(choices=_run_names(runner), label="run", scale=3, elem_id="train-run")
        stop_btn = gr.Button("Stop (checkpoint kept)", scale=1, elem_id="train-stop")
        resume_btn = gr.Button("Resume", scale=1, elem_id="train-resume")
    said_box = gr.Markdown(elem_id="train-said")  # what the last button did; the timer never writes here
    status = gr.Markdown(elem_id="train-status")  # the chosen run, refreshed every 2 s
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", color="stage", title="loss", height=220, elem_id="train-loss")
        lr_plot = gr.LinePlot(x="step", y="lr", color="stage", title="learning rate", height=220)
        norm_plot = gr.LinePlot(x="step", y="grad_norm", color="stage", title="gradient norm", height=220)
    log = gr.Textbox(label="log (last lines)", lines=8, max_lines=8, interactive=False, elem_id="train-log")

    def load(key: str) -> tuple[Any, str]:
        try:
            return _spec_yaml(key), ""
        except MMHubError as exc:
            return gr.update(), f"**Cannot load {key}**: {exc}"

    def start(text: str, run_name: str) -> tuple[Any, str]:
        try:
            said = runner.start(text, run_name)
        except MMHubError as exc:
            return gr.update(), f"**Not started**: {exc}"
        names = _run_names(runner)
        return gr.update(choices=names, value=said.split()[0]), said

    def act(fn: Any, run: str) -> str:
        if not run:
            return "pick a run first"
        try:
            return fn(runner.runs_dir / run)
        except MMHubError as exc:
            return f"**{exc}**"

    def refresh(run: str) -> tuple[Any, ...]:
        import pandas as pd

        runner.poll()
        if not run:
            return "", None, None, None, ""
        folder = runner.runs_dir / run
        metrics = train_runs.stage_metrics(folder)  # read once per tick: status and the three curves
        st = train_runs.run_status(folder, metrics)
        state = "running" if str(folder) in runner.running else \
            "queued" if any(j.run == folder for j in runner.queue) else "not running"
        bar = "#" * int(20 * st["progress"]) + "-" * (20 - int(20 * st["progress"]))
        eta = f", ETA {int(st['eta_s'] // 60)}m{int(st['eta_s'] % 60):02d}s" if st["eta_s"] else ""
        loss = f", loss {st['loss']:.4f}" if st["loss"] is not None else ""
        text = (f"**{run}** ({state}): stage {st['stage'] or 'all done'} `[{bar}]` step {st['step']}/{st['total']}"
                f"{eta}{loss}; stages done: {', '.join(st['done']) or 'none'}; samples skipped: {st['skipped']}")
        reasons = train_runs.skip_reasons(folder) if st["skipped"] else []
        if reasons:
            text += "\n\nlast skipped: " + "; ".join(f"`{r[:160]}`" for r in reasons)
        plots = [pd.DataFrame(train_runs.curve(run, metrics, k)) for k in ("loss", "lr", "grad_norm")]
        return (text, *[p if len(p) else None for p in plots], train_runs.log_tail(folder))

    def use(text: str, stage: str, dataset: str) -> tuple[Any, str]:
        try:
            if not dataset:
                return gr.update(), "pick a dataset first"
            out = train_data.set_stage_data(text, train_data.dataset_block(dataset), stage.strip() or None)
            return out, f"data: `{dataset}` set on {('stage ' + stage.strip()) if stage.strip() else 'every stage'}"
        except MMHubError as exc:
            return gr.update(), f"**{exc}**"

    def upload(text: str, stage: str, data: Any, media: Any, label: str) -> tuple[Any, str]:
        try:
            if data is None:
                return gr.update(), "choose a .json or .jsonl data file first"
            block, said = train_data.stage_upload(_path(data), _path(media) if media is not None else None,
                                                  runner.runs_dir, label or Path(_path(data)).stem)
            out = train_data.set_stage_data(text, block, stage.strip() or None)
        except MMHubError as exc:
            return gr.update(), f"**Upload not used**: {exc}"
        try:  # the data is used either way; the pre-flight says what a run would skip, or that it would refuse
            report = train_data.preflight_data(out, stage.strip() or None)
        except MMHubError as exc:
            return out, (f"{said}\n\n**Pre-flight: Start would be refused** (fix the rows, or raise the stage's "
                         f"max_bad_fraction):\n```\n{exc}\n```")
        return out, f"{said}\n\n```\n{report}\n```"

    def apply(text: str, stage: str, *values: Any) -> tuple[Any, str]:
        keys = ("lr", "max_steps", "batch_size", "lora_r")
        settings = {k: (float(v) if k == "lr" else int(v)) for k, v in zip(keys, values, strict=True) if v}
        try:
            out = train_data.set_stage_data(text, None, stage.strip() or None, settings)
        except MMHubError as exc:
            return gr.update(), f"**{exc}**"
        return out, "set " + (", ".join(f"{k} {v:g}" for k, v in settings.items()) or "nothing (all fields empty)")

    def check(text: str, stage: str) -> str:
        try:
            return f"```\n{train_data.preflight_data(text, stage.strip() or None)}\n```"
        except MMHubError as exc:
            return f"**Pre-flight refused the data**:\n```\n{exc}\n```"

    use_dataset.click(use, [spec, stage_box, dataset_dd], [spec, said_box])
    upload_btn.click(upload, [spec, stage_box, data_file, media_zip, upload_name], [spec, said_box])
    apply_btn.click(apply, [spec, stage_box, lr, steps, batch, rank], [spec, said_box])
    check_btn.click(check, [spec, stage_box], [said_box])

    def read_spec(upload: Any) -> tuple[Any, str]:
        if upload is None:
            return gr.update(), ""
        file = Path(_path(upload))
        if file.stat().st_size > 1 << 20:
            return gr.update(), f"**{file.name} is {file.stat().st_size / 2**20:.1f} MB**: a spec file is at most 1 MB"
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return gr.update(), f"**{file.name} is not UTF-8 text**: upload the spec as YAML or JSON"
        ok, message = assemble.validate(text)
        return text, (f"loaded {file.name}" if ok else f"loaded {file.name}; {message}")

    def take_assembled(text: str) -> tuple[Any, str]:
        if not (text or "").strip():
            return gr.update(), "the Assemble tab's spec box is empty: write or load a spec there first"
        return text, "the Assemble tab's spec; add stages with data below if it has none"

    load_btn.click(load, [source], [spec, said_box])
    spec_upload.upload(read_spec, [spec_upload], [spec, said_box])
    from_assemble.click(take_assembled, [assembled], [spec, said_box])
    start_btn.click(start, [spec, name], [run_dd, said_box])
    stop_btn.click(lambda r: act(runner.stop, r), [run_dd], [said_box])
    resume_btn.click(lambda r: act(runner.resume, r), [run_dd], [said_box])
    timer = gr.Timer(2.0)
    timer.tick(refresh, [run_dd], [status, loss_plot, lr_plot, norm_plot, log])


def _runs_tab(runner: Any, pool: ModelPool) -> tuple[Any, Any]:
    from mmhub.apps import train_runs
    from mmhub.registry import get_registry

    columns = ["run", "spec", "stages done", "steps", "final loss", "eval", "changed", "training time"]
    refresh_btn = gr.Button("Refresh", elem_id="runs-refresh")
    table = gr.Dataframe(headers=columns, interactive=False, elem_id="runs-table")
    picked = gr.Dropdown(choices=_run_names(runner), multiselect=True, label="runs to overlay", elem_id="runs-pick")
    overlay = gr.LinePlot(x="step", y="loss", color="run", title="loss, runs overlaid", height=260)
    with gr.Row():
        path = gr.Textbox(label="model folder of the first picked run", interactive=False, scale=3,
                          elem_id="runs-model-path")
        chat_with = gr.Button("Chat with this model", scale=1, elem_id="runs-chat")
    with gr.Row():
        task = gr.Dropdown(choices=sorted(get_registry().eval_tasks), value="easy_vqa", label="evaluation task",
                           scale=2, elem_id="runs-task")
        limit = gr.Number(label="items (first N)", value=50, precision=0, scale=1)
        blind = gr.Checkbox(label="blind ablation too", value=False, scale=1)
        eval_btn = gr.Button("Evaluate", scale=1, elem_id="runs-evaluate")
    scores = gr.Markdown(elem_id="runs-eval")

    def show() -> tuple[Any, Any]:
        return train_runs.runs_table(runner.runs_dir), gr.update(choices=_run_names(runner))

    def plot(names: list[str]) -> tuple[Any, str]:
        import pandas as pd

        runs = [runner.runs_dir / n for n in names or []]
        frame = pd.DataFrame(train_runs.curves(runs, "loss"))
        model = ""
        if runs:
            done = train_runs.run_status(runs[0])["done"]
            model = str(runs[0] / done[-1] / "model") if done else ""
        return (frame if len(frame) else None), model

    def run_eval(model_path: str, task_name: str, n: Any, with_blind: bool) -> tuple[str, Any]:
        if not model_path:
            return "pick a run with a finished stage first", gr.update()
        from pathlib import Path

        folder = Path(model_path)  # RUN/STAGE/model
        try:
            loaded = pool.get(f"folder:{model_path}")
            text, _ = train_runs.evaluate_run(loaded.model, folder.parent.parent, folder.parent.name, task_name,
                                              int(n) if n else None, bool(with_blind))
        except MMHubError as exc:
            return f"**Not evaluated**: {exc}", gr.update()
        return text, train_runs.runs_table(runner.runs_dir)

    refresh_btn.click(show, [], [table, picked])
    eval_btn.click(run_eval, [path, task, limit, blind], [scores, table])
    picked.change(plot, [picked], [overlay, path])
    return chat_with, path


def _run_names(runner: Any) -> list[str]:
    from mmhub.apps.train_runs import runs_table

    return [row[0] for row in runs_table(runner.runs_dir)]


def _recipe_and_preset_keys() -> list[str]:
    from mmhub.cli import recipes

    return [r["name"] for r in recipes()] + _preset_keys()


def _spec_yaml(key: str) -> str:
    """A recipe's YAML as shipped (comments kept), or a preset's spec."""
    from mmhub.cli import recipes

    for r in recipes():
        if r["name"] == key:
            from pathlib import Path

            return Path(r["file"]).read_text()
    return assemble.preset_yaml(key)


def _assemble_tab() -> Any:
    """The Assemble tab; returns its spec box (the Train tab can start from it)."""
    enc_names = assemble.names("encoder", "image")
    proj_names = assemble.names("projector")
    bb_names = assemble.names("backbone")
    outp_names = [assemble.NONE] + assemble.names("output_projector")
    gen_names = [assemble.NONE] + assemble.names("generator")
    presets = sorted(k for k in _preset_keys())
    with gr.Row():
        preset = gr.Dropdown(choices=presets, value="llava-1.5:tiny" if "llava-1.5:tiny" in presets else None,
                             label="Shipped preset", scale=3)
        preset_btn = gr.Button("Load preset into the spec", scale=1)
    with gr.Row():
        name = gr.Textbox(value="my-model", label="name")
        modality = gr.Dropdown(choices=list(assemble.MODALITIES), value="image", label="input modality")
        template = gr.Dropdown(choices=TEMPLATES, value="auto", label="chat template")
    with gr.Row():
        with gr.Column():
            enc = gr.Dropdown(choices=enc_names, value="open_clip" if "open_clip" in enc_names else enc_names[0],
                              label="encoder", elem_id="encoder-select")
            enc_set = gr.Code(assemble.example_yaml("encoder", enc.value), language="yaml", label="encoder settings")
        with gr.Column():
            proj = gr.Dropdown(choices=proj_names, value="mlp", label="input projector", elem_id="projector-select")
            proj_set = gr.Code(assemble.example_yaml("projector", "mlp"), language="yaml", label="projector settings")
        with gr.Column():
            bb = gr.Dropdown(choices=bb_names, value="hf_causal_lm", label="backbone", elem_id="backbone-select")
            bb_set = gr.Code(assemble.example_yaml("backbone", "hf_causal_lm"), language="yaml",
                             label="backbone settings")
    with gr.Row():
        outp = gr.Dropdown(choices=outp_names, value=assemble.NONE, label="output projector",
                           info="none registered yet" if len(outp_names) == 1 else None)
        gen = gr.Dropdown(choices=gen_names, value=assemble.NONE, label="generator",
                          info="none registered yet" if len(gen_names) == 1 else None)
    to_yaml = gr.Button("Write the spec from the form", elem_id="form-to-yaml")
    spec = gr.Code(language="yaml", label="spec (YAML; edit freely)", elem_id="spec-yaml", interactive=True, lines=14)
    with gr.Row():
        validate_btn = gr.Button("Validate", variant="primary", elem_id="validate")
        build_btn = gr.Button("Build", elem_id="build")
        save_btn = gr.Button("Save spec for download")
    result = gr.Markdown(elem_id="assemble-result")
    table = gr.Dataframe(headers=["slot", "type", "parameters", "trainable"], interactive=False, label="parameters")
    picture = gr.Image(label="the model (a panel per stage; what it trains coloured)", type="filepath",
                       interactive=False, elem_id="model-diagram")
    spec_file = gr.File(label="spec file", interactive=False)

    def write(*form: Any) -> tuple[str, str]:
        try:
            return assemble.form_to_yaml(*form), ""
        except MMHubError as exc:
            return gr.update(), f"**Invalid settings**: {exc}"

    def save(text: str) -> tuple[Any, str]:
        try:
            return assemble.save(text), ""
        except MMHubError as exc:
            return None, f"**Cannot save**: {exc}"

    def load_preset(k: str) -> tuple[Any, str]:
        try:
            return assemble.preset_yaml(k), f"Loaded preset {k}; validate or build it."
        except MMHubError as exc:
            return gr.update(), str(exc)

    form = [name, modality, enc, enc_set, proj, proj_set, bb, bb_set, template, outp, gr.State(""), gen, gr.State("")]
    modality.change(lambda m: gr.update(choices=assemble.names("encoder", m),
                                        value=(assemble.names("encoder", m) or [None])[0]), [modality], [enc])
    enc.change(lambda n: assemble.example_yaml("encoder", n), [enc], [enc_set])
    proj.change(lambda n: assemble.example_yaml("projector", n), [proj], [proj_set])
    bb.change(lambda n: assemble.example_yaml("backbone", n), [bb], [bb_set])
    to_yaml.click(write, form, [spec, result])
    preset_btn.click(load_preset, [preset], [spec, result])
    validate_btn.click(lambda text: assemble.validate(text)[1], [spec], [result])
    build_btn.click(assemble.build_and_draw, [spec], [table, result, picture], concurrency_id="build",
                    concurrency_limit=1)
    save_btn.click(save, [spec], [spec_file, result])
    return spec


def _preset_keys() -> list[str]:
    from mmhub.registry import get_registry

    return [p.key for p in get_registry().presets.values()]
