import pytest

pytest.importorskip("composer")

from composer.core import Event

from amortize.data.tokenizer import Tokenizer
from amortize.eval.callback import EvalCallback, unwrap_clip_model
from amortize.eval.retrieval import RetrievalTask
from tests.eval.fakes import TinyClip


class _Wrapper:
    def __init__(self, model):
        self.model = model


class _Logger:
    def __init__(self):
        self.logged = {}

    def log_metrics(self, metrics):
        self.logged.update(metrics)


class _State:
    def __init__(self, model, epoch, batch=None):
        self.model = model
        self.timestamp = type("T", (), {"epoch": epoch, "batch": 10 * epoch if batch is None else batch})()


def test_callback_logs_metrics_at_epoch_end():
    import torch

    task = RetrievalTask("toy", torch.rand(5, 3, 8, 8), [f"item {i}" for i in range(5)])
    cb = EvalCallback(Tokenizer(16), [task], every_n_epochs=2)
    logger = _Logger()
    cb.run_event(Event.EPOCH_END, _State(_Wrapper(TinyClip()), 1), logger)
    assert logger.logged == {}
    cb.run_event(Event.EPOCH_END, _State(_Wrapper(TinyClip()), 2), logger)
    assert "eval/toy/image_to_text_R@1" in logger.logged
    with pytest.raises(TypeError, match="encode_image"):
        unwrap_clip_model(object())


def test_callback_runs_every_n_batches_and_once_per_batch_count():
    import torch

    task = RetrievalTask("toy", torch.rand(5, 3, 8, 8), [f"item {i}" for i in range(5)])
    cb = EvalCallback(Tokenizer(16), [task], every_n_epochs=1, every_n_batches=3, at_fit_end=True)
    runs = []
    original = cb._run
    cb._run = lambda state, logger: (runs.append(int(state.timestamp.batch)), original(state, logger))
    model = _Wrapper(TinyClip())
    for b in range(1, 7):
        cb.run_event(Event.BATCH_END, _State(model, 0, b), _Logger())
    cb.run_event(Event.EPOCH_END, _State(model, 1, 6), _Logger())  # batch 6 was just evaluated
    cb.run_event(Event.FIT_END, _State(model, 1, 6), _Logger())
    assert runs == [3, 6]
    cb.run_event(Event.FIT_END, _State(model, 1, 7), _Logger())
    assert runs == [3, 6, 7]
