import warnings


from ssl_vit.callbacks.collapse import CollapseMonitor


def test_warns_once_per_mode_and_again_after_recovery():
    monitor = CollapseMonitor()
    healthy = {"collapse/teacher_entropy": 0.5, "collapse/teacher_batch_entropy": 0.9}
    uniform = {"collapse/teacher_entropy": 0.99, "collapse/teacher_batch_entropy": 0.999}
    one_hot = {"collapse/teacher_entropy": 0.01, "collapse/teacher_batch_entropy": 0.01}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert monitor.check(100, healthy) == []
        assert monitor.check(150, uniform)[0].startswith("uniform")
        monitor.check(200, uniform)  # still collapsed: no second warning
        monitor.check(250, healthy)
        monitor.check(300, uniform)  # collapsed again after recovering: warned again
        modes = monitor.check(350, one_hot)
    messages = [str(w.message) for w in caught]
    assert sum("uniform" in m for m in messages) == 2
    assert sum("one-hot" in m for m in messages) == 1 and modes[0].startswith("one-hot")
    assert all("step" in m for m in messages)
