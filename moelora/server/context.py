"""What every route needs: the loaded model, the server's settings, model-name resolution, adapter paths,
and starting engine requests under the --max-waiting bound."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moelora.config import ServerArgs
from moelora.engine.stream import EngineDeadError
from moelora.llm import LLM
from moelora.loader.presets import PRESET_PREFIX
from moelora.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from moelora.sampling_params import SamplingParams
from moelora.server.metrics import ServerMetrics
from moelora.server.protocol import ApiError
from moelora.server.runs import Run

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what the loader reads from an adapter folder


def default_served_name(model: str) -> str:
    """The model folder's name for a folder, the preset's name for `preset:NAME` (no ':', which separates
    an adapter); the name as given for 'demo' or a Hugging Face id."""
    if model.startswith(PRESET_PREFIX):
        return model.removeprefix(PRESET_PREFIX)
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


@dataclass
class ServerContext:
    llm: LLM
    args: ServerArgs
    served_name: str
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def lora_dir(self) -> Path | None:
        return Path(self.args.lora_dir).resolve() if self.args.lora_dir is not None else None

    def adapter_names(self) -> list[str]:
        loras = self.llm.engine.loras
        return loras.names() if loras is not None else []

    def resolve_model(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for anything else."""
        if model == self.served_name:
            return None
        prefix = f"{self.served_name}:"
        name = model[len(prefix) :] if model.startswith(prefix) else model
        if name in self.adapter_names():
            return name
        known = ", ".join([self.served_name, *self.adapter_names()])
        raise ApiError(
            404,
            f"model '{model}' does not exist: use the base model '{self.served_name}' or an adapter, "
            f"as 'NAME' or '{self.served_name}:NAME' (served: {known})",
            param="model",
            code="model_not_found",
        )

    def checked_lora_path(self, raw: str) -> Path:
        """`raw` (absolute, or relative to --lora-dir) resolved; 403 unless the folder and every file the
        loader reads from it resolve inside --lora-dir (a symbolic link out of it is refused, whether it
        is the folder or one of the files)."""
        root = self.lora_dir
        if root is None:
            raise ApiError(
                403, "loading adapters at runtime is off: restart the server with --lora-dir DIR to allow it"
            )
        if "\x00" in raw:
            raise ApiError(400, "lora_path must not contain a NUL character", param="lora_path")
        given = Path(raw)
        if ".." in given.parts:
            raise ApiError(403, f"lora_path '{raw}' must not contain '..'", param="lora_path")
        folder = (given if given.is_absolute() else root / given).resolve()
        for path in (folder, *(folder / name for name in ADAPTER_FILES)):
            if not path.resolve().is_relative_to(root):
                raise ApiError(
                    403,
                    f"lora_path '{raw}': '{path.relative_to(folder) if path != folder else raw}' leads "
                    f"outside --lora-dir '{root}' (symbolic links out of it are refused)",
                    param="lora_path",
                )
        return folder

    def check_texts(self, texts: Sequence[str], param: str) -> None:
        """400 before tokenising: text that is not valid Unicode (a lone surrogate), or longer than
        --max-prompt-chars altogether."""
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(
                    400,
                    f"the {param} are not valid Unicode text (a lone surrogate at character {e.start})",
                    param=param,
                ) from None
        limit = self.args.max_prompt_chars or 32 * self.llm.engine.max_model_len
        size = sum(len(t) for t in texts)
        if size > limit:
            raise ApiError(
                400,
                f"the {param} have {size} characters, more than the {limit} this server takes "
                f"(--max-prompt-chars; max_model_len is {self.llm.engine.max_model_len} tokens)",
                param=param,
            )

    def start(
        self, prompts: Sequence[str | list[int]], params: SamplingParams, adapter: str | None
    ) -> list[Run]:
        """Submit one engine request per prompt; all or none (a failure aborts the ones already started).
        Runs in a worker thread (tokenising may take a while)."""
        limits = self.args
        if params.n > limits.max_n or params.n > limits.max_waiting:
            limit, flag = min((limits.max_n, "--max-n"), (limits.max_waiting, "--max-waiting"))
            raise ApiError(400, f"n {params.n} is more than this server takes ({flag} {limit})", param="n")
        runs: list[Run] = []
        try:
            for i, prompt in enumerate(prompts):
                runs.append(self._start_one(prompt, params, adapter, i * params.n))
        except BaseException:
            for run in runs:
                run.cancel(self.llm.engine)
            raise
        self.metrics.requests.labels(adapter or self.served_name).inc(len(runs))
        return runs

    def _start_one(
        self, prompt: str | list[int], params: SamplingParams, adapter: str | None, at: int
    ) -> Run:
        limit = self.args.max_waiting
        if not self.metrics.pending.try_add(limit, params.n):
            raise ApiError(
                503,
                f"{limit} sequences are already waiting for their first token (--max-waiting {limit}): "
                "retry later",
            )
        timer = self.metrics.timer(params.n)
        try:
            stream = self.llm.engine.submit_stream(prompt, params, adapter)
        except BaseException as e:
            timer.close()  # whatever failed, the request never started: it holds nothing any more
            if isinstance(e, EngineDeadError):
                raise ApiError(503, f"the engine is not running: {e}") from e
            if isinstance(e, ValueError):
                raise ApiError(400, str(e), param=getattr(e, "param", None)) from e
            raise
        return Run(stream, timer, at)
