"""The lmms-eval model both plug-in models share: requests in, batches through a wrapped host.

:class:`AllocatedVLM` is an ``lmms_eval.api.model.lmms`` ("simple" model: lmms-eval hands it
the task's prompt text and a ``doc_to_visual`` callable). A family subclass says how to load
the host and its processor, how to turn one request into a chat prompt, how to wrap the host
with an allocator, and how many visual tokens an image has. Everything else is here:

- ``generate_until``: requests grouped by generation settings (lmms-eval's ``Collator``),
  longest prompt first, ``batch_size`` prompts per batch, left padding, one ``generate`` call
  per batch through the wrapped host; the prompt is cut off the output and the text is cut at
  the first stop string (``until``).
- ``loglikelihood``: ``(context, continuation)`` pairs, batched; the context and the
  context + continuation are both encoded by the processor (the continuation's tokens are
  what the second has beyond the first, the lm-evaluation-harness rule), one forward per
  batch; gives ``(negative log-likelihood of the continuation in nats, whether greedy
  decoding gives the continuation)``. lmms-eval 0.7.3 scores multiple-choice tasks by the
  *smallest* value (``np.argmin``: it takes the first number as a loss, as its own models
  return, see EvolvingLMMs-Lab/lmms-eval#370), hence the sign; the sum over the tokens, not
  their mean, so ``acc`` ranks the choices by likelihood and ``acc_norm`` by likelihood
  per character, as in lm-evaluation-harness. Its evaluator turns every model output that is
  not a string or a ``GenerationResult`` into ``str(output)``, so each pair is handed back
  inside ``GenerationResult(text=pair)``, which it unwraps unchanged
  (:meth:`AllocatedVLM.loglikelihood_pairs` gives the bare pairs).

The wrapped host drops image positions from the sequence, so the logits cover the shortened
sequence; the continuation is text at the end of each left-padded row, so its logits are the
last positions whatever was dropped. ``unwrapped=True`` runs the plain host instead (the
reference: with ``allocator=full`` both give the same generations and log-likelihoods).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image

from arr_coc.allocators import Allocator, create_allocator, list_allocators

__all__ = ["AllocatedVLM", "parse_allocator_kwargs", "parse_budget"]

IMAGE_PLACEHOLDER = "<image>"


def parse_budget(budget: Any) -> int | float | None:
    """``--model_args`` budget -> ``None`` (all tokens), an int >= 0, or a fraction in (0, 1].

    lmms-eval parses ``budget=64`` to ``64`` and ``budget=0.25`` to ``0.25``; strings
    ``none`` / ``full`` / ``all`` mean every token. An int counts tokens per image, a float
    is a share of the image's tokens (``1.0`` keeps all of them).
    """
    if budget is None:
        return None
    if isinstance(budget, str):
        text = budget.strip().lower()
        if text in ("", "none", "full", "all"):
            return None
        try:
            budget = float(text) if any(c in text for c in ".e") else int(text)
        except ValueError as err:
            raise ValueError(f"budget: expected an int, a fraction in (0, 1] or 'none', got {budget!r}") from err
    if isinstance(budget, bool):
        raise ValueError(f"budget: expected an int, a fraction in (0, 1] or 'none', got {budget!r}")
    if isinstance(budget, int):
        if budget < 0:
            raise ValueError(f"budget: expected an int >= 0, got {budget}")
        return budget
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget: a float budget is a fraction of the image's tokens, expected (0, 1], got {budget}")
        return budget
    raise ValueError(f"budget: expected an int, a fraction in (0, 1] or 'none', got {budget!r}")


def _coerce_value(value: Any) -> Any:
    """One allocator keyword from the ``--model_args`` string: JSON lists -> tuples, 'none' -> None."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() == "none":
        return None
    if text[:1] in "[(" and text[-1:] in "])":
        try:
            parsed = json.loads("[" + text[1:-1] + "]")
        except json.JSONDecodeError as err:
            raise ValueError(f"allocator keyword: cannot parse the list {value!r} (expected e.g. [1,2])") from err
        return tuple(parsed)
    return value


def parse_allocator_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The allocator's keywords from ``--model_args`` (``levels=[1,2]`` -> ``(1, 2)``, ``none`` -> None)."""
    return {k: _coerce_value(v) for k, v in kwargs.items()}


def build_allocator(name: str, kwargs: dict[str, Any]) -> Allocator:
    """``create_allocator(name, **kwargs)`` with errors that name the model argument."""
    if not isinstance(name, str) or name not in list_allocators():
        raise ValueError(f"allocator: unknown allocator {name!r}; known: {', '.join(list_allocators())}")
    try:
        return create_allocator(name, **parse_allocator_kwargs(kwargs))
    except TypeError as err:
        raise ValueError(
            f"model_args: {sorted(kwargs)} are not model options nor keywords of allocator {name!r} ({err})"
        ) from err


def wrap_options(target: Callable[..., Any], processor: Any, query: str | None) -> dict[str, Any]:
    """Keywords for a plug-in's ``wrap``: the processor (the question-only query) where it takes one.

    ``target`` is the callable whose signature decides (``wrap`` or the class it builds);
    ``query`` (a model argument) is passed only when given, and raises ``ValueError`` where
    the plug-in has no ``query`` option.
    """
    params = inspect.signature(target).parameters
    out: dict[str, Any] = {}
    if "processor" in params:
        out["processor"] = processor
    if query is not None:
        if "query" not in params:
            raise ValueError(f"query: this plug-in ({target.__qualname__}) has no query option")
        out["query"] = query
    return out


def _dtype(value: Any) -> torch.dtype | str:
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype: expected 'auto' or a torch dtype name (bfloat16, float16, float32), got {value!r}")
    return dt


class AllocatedVLM(lmms):
    """An lmms-eval model running a Hugging Face VLM with an allocator in front of its LLM.

    Model arguments (``--model_args key=value,...``):

    pretrained:   local folder (or hub name) of the host model and its processor.
    allocator:    registered allocator name (``full``: every token).
    budget:       visual tokens per image: an int, a fraction in (0, 1] of the image's
                  tokens, or ``none`` (all).
    device:       ``cuda``, ``cuda:1``, ``cpu``... (default: cuda when available).
    dtype:        ``auto`` (the checkpoint's), ``bfloat16``, ``float16``, ``float32``.
    batch_size:   prompts per forward / generate call.
    attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``flash_attention_2``, ``eager``).
    system_prompt: family default when not given (see the subclass).
    max_new_tokens: generation cap when the task gives none (default 128).
    allocator_checkpoint: a trained allocator (a folder written by
                  :func:`arr_coc.training.hub.save_allocator`, or a stage-2 ``.ckpt``), loaded
                  with :func:`~arr_coc.training.hub.load_allocator`; it replaces ``allocator``.
    unwrapped:    ``true`` runs the plain host (no allocator): the reference run.
    query:        which prompt tokens the allocator reads as the query, where the plug-in
                  has the option (``prompt``: every text token); by default the plug-in's
                  own rule, given the processor (the user's question).
    anything else: a keyword of the allocator (``alpha=0.5``, ``levels=[1,2]``).
    """

    is_simple = True
    #: the transformers model classes this family loads, by config.model_type
    family_name = "vlm"

    def __init__(
        self,
        pretrained: str,
        allocator: str = "full",
        budget: Any = None,
        *,
        device: str | None = None,
        dtype: Any = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = 128,
        unwrapped: bool = False,
        query: str | None = None,
        allocator_checkpoint: str | None = None,
        trust_remote_code: bool = False,
        **allocator_kwargs: Any,
    ) -> None:
        super().__init__()
        if not pretrained:
            raise ValueError("pretrained: expected a local folder or a hub name of the host model")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError) as err:
            raise ValueError(f"batch_size: expected an int >= 1 ('auto' is not supported), got {batch_size!r}") from err
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        self.budget = parse_budget(budget)
        if allocator_checkpoint:
            if allocator_kwargs:
                raise ValueError(
                    f"model_args: {sorted(allocator_kwargs)} given with allocator_checkpoint, whose folder "
                    "already names the allocator and its arguments"
                )
            from arr_coc.training.hub import load_allocator

            self.allocator_module: Allocator = load_allocator(str(allocator_checkpoint))
            self.allocator_name = f"checkpoint:{allocator_checkpoint}"
        else:
            self.allocator_name = allocator
            self.allocator_module = build_allocator(allocator, allocator_kwargs)
        self.unwrapped = bool(unwrapped)
        self.query = query
        self.max_new_tokens = max_new_tokens
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else system_prompt

        from accelerate import Accelerator

        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            self._device = torch.device(f"cuda:{accelerator.local_process_index}")
            self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pretrained = pretrained
        self._model, self.processor = self._load(
            pretrained,
            dtype=_dtype(dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=bool(trust_remote_code),
        )
        self._model.eval()
        self.tokenizer = self.processor.tokenizer
        self.allocator_module.to(self._device)
        self.allocator_module.eval()
        self.vlm = self._wrap(self._model, self.allocator_module, self.budget)

    # ------------------------------------------------------------------ family hooks
    def _load(self, pretrained: str, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
        """(host model on ``self.device``, its processor)."""
        raise NotImplementedError

    def _wrap(self, model: torch.nn.Module, allocator: Allocator, budget: int | float | None) -> Any:
        """The host wrapped with the allocator (``generate`` and ``__call__`` like the host)."""
        raise NotImplementedError

    def _messages(self, context: str, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
        """The chat messages of one request: the images, then the task's text."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return messages

    def _prompt(self, context: str, images: Sequence[Image.Image]) -> str:
        """The prompt text of one request, with the processor's chat template."""
        context = context.replace(IMAGE_PLACEHOLDER, "").strip() if images else context
        return self.processor.apply_chat_template(
            self._messages(context, images), tokenize=False, add_generation_prompt=True
        )

    # ------------------------------------------------------------------ lmms properties
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def runner(self) -> Any:
        """What requests run through: the wrapped host, or the plain one with ``unwrapped``."""
        return self._model if self.unwrapped else self.vlm

    def tok_encode(self, string: str) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    # ------------------------------------------------------------------ inputs
    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        if isinstance(visuals, Image.Image):
            visuals = [visuals]
        out = []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(
                    f"doc_to_visual: task {task!r} gave a {type(v).__name__}; {type(self).__name__} takes images only"
                )
            out.append(v.convert("RGB"))
        return out

    def _encode(self, prompts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """Processor over a batch, left padded, on the device (floats in the model's dtype)."""
        flat = [im for ims in images for im in ims]
        batch = self.processor(
            text=prompts, images=flat or None, padding=True, padding_side="left", return_tensors="pt"
        )
        out = {}
        dtype = next(self._model.parameters()).dtype
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self._device, dtype=dtype) if value.is_floating_point() else value.to(self._device)
            out[key] = value
        return out

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.eot_token_id or 0))

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled) generation for ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        if not requests:
            return []

        def _sort_key(args: tuple) -> tuple[int, str]:
            return -len(self.tok_encode(args[0])), args[0]

        collator = lmms_utils.Collator([r.args for r in requests], _sort_key, grouping=True)
        results: list[str] = []
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])
            until = gen_kwargs.pop("until", None)
            if until is None:
                until = [self.tokenizer.decode([self.eot_token_id])] if self.eot_token_id is not None else []
            elif isinstance(until, str):
                until = [until]
            elif not isinstance(until, (list, tuple)):
                raise ValueError(f"gen_kwargs: 'until' must be a string or a list of strings, got {type(until).__name__}")
            images = [self._visuals(f, i, t, s) for f, i, t, s in zip(doc_to_visual, doc_ids, tasks, splits)]
            prompts = [self._prompt(c, ims) for c, ims in zip(contexts, images)]
            inputs = self._encode(prompts, images)
            texts = self._generate(inputs, gen_kwargs)
            for context, text in zip(contexts, texts):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), text)
        return collator.get_original(results)

    def _generate(self, inputs: dict[str, torch.Tensor], gen_kwargs: dict[str, Any]) -> list[str]:
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = temperature > 0  # lmms-eval's rule: temperature 0 is greedy whatever do_sample says
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": do_sample,
            "pad_token_id": self._pad_id(),
            "eos_token_id": self.eot_token_id,
        }
        if do_sample:
            kwargs["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                kwargs["top_p"] = float(gen_kwargs["top_p"])
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.runner.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """lmms-eval's entry: :meth:`loglikelihood_pairs`, each pair in a ``GenerationResult``."""
        return [GenerationResult(text=pair) for pair in self.loglikelihood_pairs(requests)]  # type: ignore[arg-type]

    def loglikelihood_pairs(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(-log p(continuation | context, images) in nats, is greedy)`` per request, batched."""
        if not requests:
            return []
        items = []
        for args in (r.args for r in requests):
            context, target, doc_to_visual, doc_id, task, split = args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            if isinstance(continuation, list):  # a task whose target is a list: score the first
                continuation = continuation[0]
            if not isinstance(continuation, str):
                raise ValueError(f"continuation: expected a string, got {type(continuation).__name__}")
            images = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self._prompt(context, images)
            # a trailing space of the prompt belongs to the continuation (lm-evaluation-harness)
            n_space = len(prompt) - len(prompt.rstrip(" "))
            if n_space:
                prompt, continuation = prompt[:-n_space], prompt[-n_space:] + continuation
            items.append((prompt, continuation, images))

        def _sort_key(item: tuple) -> tuple[int, str]:
            return -len(self.tok_encode(item[0] + item[1])), item[0]

        collator = lmms_utils.Collator(items, _sort_key)
        results: list[tuple[float, bool]] = []
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            results.extend(self._score(chunk))
        return collator.get_original(results)

    def _score(self, chunk: Sequence[tuple[str, str, list[Image.Image]]]) -> list[tuple[float, bool]]:
        prompts = [p for p, _, _ in chunk]
        images = [ims for _, _, ims in chunk]
        ctx = self._encode(prompts, images)
        full = self._encode([p + c for p, c, _ in chunk], images)
        n_ctx = ctx["attention_mask"].sum(dim=1)
        n_full = full["attention_mask"].sum(dim=1)
        n_cont = (n_full - n_ctx).tolist()
        if min(n_cont) < 1:
            raise ValueError("continuation: encodes to no token beyond the context")
        keep = max(n_cont) + 1
        with torch.inference_mode():
            out = self.runner(**full, logits_to_keep=keep)
        logits = out.logits[:, -keep:].float()  # [B, keep, V]
        logprobs = torch.log_softmax(logits, dim=-1)
        ids = full["input_ids"]
        results = []
        for b, n in enumerate(n_cont):
            target = ids[b, -n:]  # [n] the continuation (left padding: the row's last tokens)
            lp = logprobs[b, -n - 1 : -1]  # [n, V] the positions that predict it
            nll = -lp.gather(-1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(dim=-1) == target).all())
            results.append((float(nll), greedy))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__}: multi-round generation is not supported")
