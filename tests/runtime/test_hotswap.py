"""Variant and thread hot swaps under continuous load: no request is dropped or fails."""

import threading
import time

import numpy as np

from device.runtime.runtime import Runtime
from drivers.sim.signal import WINDOW, VibrationSource


def test_hot_swaps_under_continuous_load_drop_nothing(settings, vibration):
    events = []
    rt = Runtime(settings(isolation="process", variant="full"), manifest=vibration,
                 on_event=lambda k, d: events.append((k, d)))
    rt.start()
    src = VibrationSource(seed=11)
    windows = [src.read(WINDOW) for _ in range(32)]
    stop = threading.Event()
    log = []  # (started, finished, variant) per completed request
    errors = []

    def load():
        i = 0
        while not stop.is_set():
            try:
                started = time.monotonic()
                p = rt.predict(windows[i % len(windows)])
                assert abs(float(p.scores.sum()) - 1.0) < 1e-4 and 0.0 <= p.score <= 1.0  # logits -> probabilities
                log.append((started, time.monotonic(), p.variant))
            except Exception as exc:  # noqa: BLE001 - any failure is the defect under test
                errors.append(exc)
            i += 1

    t = threading.Thread(target=load)
    t.start()
    try:
        swaps = []
        for target in ("lite", "full", "lite"):
            begin = time.monotonic()
            assert rt.set_variant(target) == target
            swaps.append((begin, time.monotonic(), target))
            time.sleep(0.3)  # a quiet stretch between swaps, to check which variant serves after each
        begin = time.monotonic()
        rt.set_threads(1)
        swaps.append((begin, time.monotonic(), "lite"))
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(30)
    st = rt.status()
    rt.close()

    assert errors == []
    for i, (begin, end, target) in enumerate(swaps):
        # The old worker kept serving while the new one loaded...
        assert any(begin <= done <= end for _, done, _ in log), "no request was served during a swap"
        # ...and every request that started after the swap returned ran on the new variant.
        nxt = swaps[i + 1][0] if i + 1 < len(swaps) else float("inf")
        after = [v for started, _, v in log if end < started < nxt]
        assert after and set(after) == {target}
    assert log[-1][2] == "lite"
    assert st["threads"] == 1 and st["swaps"] == 4 and st["failures"] == 0
    # the thread change swapped too, but the variant did not change: no variant_changed for it
    assert [(d["from"], d["to"]) for k, d in events if k == "variant_changed"] == [
        ("full", "lite"), ("lite", "full"), ("full", "lite")]


def test_set_variant_rejects_unknown_names_without_touching_the_active_one(settings, vibration):
    with Runtime(settings(isolation="inline"), manifest=vibration) as rt:
        before = rt.variant
        try:
            rt.set_variant("turbo")
        except Exception as exc:
            assert "has no variant 'turbo'" in str(exc) and "full" in str(exc)
        else:
            raise AssertionError("unknown variant accepted")
        assert rt.variant == before and rt.swaps == 0
        assert rt.infer(np.zeros((256, 3), np.float32)).outputs[0].shape == (1, 4)
