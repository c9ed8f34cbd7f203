"""Restore targets: preparing and checking the caller's model and optimizer before a restore.

:meth:`~ckptmirror.mirror.Mirror.restore` fills the state dicts of ``model`` and ``optim`` in
place. Before anything is read, a fresh optimizer over sharded (DTensor) parameters gets its
state tensors (:func:`init_sharded_optimizer_state`), so that there is something to fill; and
before any tensor is written, the stored state tree is checked against what
``load_state_dict`` would accept (:func:`check_fits`), so that a checkpoint that does not fit
is refused with :class:`StateMismatchError` while the caller's state is still untouched.

Then the filling itself: :func:`restore_targets` hands restore the model's own tensors to fill,
:func:`filled_in_place` says when ``load_state_dict`` can be skipped (every tensor filled
already), and :func:`indexed_groups` makes torch's ``Optimizer.load_state_dict`` linear in the
parameters instead of quadratic.
"""

from __future__ import annotations

import operator
from typing import Any, Protocol, cast

import torch

from ..errors import StateMismatchError
from .tree import is_dtensor


class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: modules, optimizers, schedulers."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def init_sharded_optimizer_state(optim: Any) -> None:
    """Give a fresh optimizer over sharded (DTensor) parameters its state tensors.

    Restoring fills the optimizer's state in place, and for DTensor parameters that state must
    be DTensors laid out like the parameters: loading plain tensors would leave the optimizer
    inconsistent, and resharding needs a target. A step with zero gradients and learning rate
    0 creates them without changing any parameter (DCP's get_optimizer_state_dict does the same).
    """
    if getattr(optim, "state", None) or not hasattr(optim, "param_groups"):
        return
    params = [p for g in optim.param_groups for p in g["params"]]
    if not any(is_dtensor(p) for p in params):
        return
    saved_lr = [g["lr"] for g in optim.param_groups]
    saved_grads = [p.grad for p in params]
    try:
        for g in optim.param_groups:
            g["lr"] = 0.0 if not isinstance(g["lr"], torch.Tensor) else torch.zeros_like(g["lr"])
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optim.step()
    finally:
        for g, lr in zip(optim.param_groups, saved_lr):
            g["lr"] = lr
        for p, grad in zip(params, saved_grads):
            p.grad = grad


def check_fits(model: Stateful | None, optim: Stateful | None, targets: dict[str, Any], skeleton: Any) -> None:
    """Refuse, before any tensor is written, a checkpoint that ``load_state_dict`` would reject."""
    if not (isinstance(skeleton, dict) and {"model", "optim", "extra"} <= set(skeleton)):
        raise StateMismatchError("this step was written by save_state(), not save(); use load_state()")
    if model is not None and skeleton["model"] is None:
        raise StateMismatchError("this step holds no model state")
    stored, target = skeleton["optim"], targets["optim"]
    if optim is None or stored is None or not isinstance(target, dict):
        return
    s_groups, t_groups = stored.get("param_groups"), target.get("param_groups")
    if isinstance(s_groups, list) and isinstance(t_groups, list):
        if len(s_groups) != len(t_groups):
            raise StateMismatchError(f"optimizer has {len(t_groups)} param group(s), the checkpoint {len(s_groups)}")
        for i, (sg, tg) in enumerate(zip(s_groups, t_groups)):
            if isinstance(sg, dict) and isinstance(tg, dict) and len(sg.get("params", ())) != len(tg.get("params", ())):
                raise StateMismatchError(
                    f"optimizer param group {i} has {len(tg.get('params', ()))} parameter(s), "
                    f"the checkpoint {len(sg.get('params', ()))}"
                )


def stock_loading(model: Any, optim: Any) -> bool:
    """Whether ``load_state_dict`` of ``model`` and ``optim`` is torch's own, without hooks.

    Then, once :func:`check_fits` and the key/shape match passed, loading cannot refuse the
    restored state (it only copies tensors onto themselves and sets the optimizer's groups),
    so restore may land the last verified bytes right before it without keeping an undo copy
    of them (:class:`~ckptmirror.restore.undo.Landing`). Anything else (an override, a load
    hook, a module with its own ``_load_from_state_dict``) may refuse after the bytes landed
    and keeps the undo copy. The module's ``state_dict()`` must be torch's own too (then it
    hands out the module's own tensors, which restore fills in place).
    """
    if model is not None:
        if not _stock_state_dict(model, loading=True):
            return False
    if optim is not None:
        if not isinstance(optim, torch.optim.Optimizer) or "load_state_dict" in vars(optim):
            return False
        if type(optim).load_state_dict is not torch.optim.Optimizer.load_state_dict:
            return False
        if getattr(optim, "_optimizer_load_state_dict_pre_hooks", None) or getattr(
            optim, "_optimizer_load_state_dict_post_hooks", None
        ):
            return False
    return True


def _stock_state_dict(model: Any, loading: bool = False) -> bool:
    """Whether ``model.state_dict()`` is torch's own, without hooks, in every submodule (and,
    with ``loading``, ``load_state_dict`` too): then it hands out the module's own tensors, and
    ``keep_vars=True`` gives the very tensors that ``detach()`` would alias."""
    if not isinstance(model, torch.nn.Module):
        return False
    names = {"load_state_dict", "state_dict"} if loading else {"state_dict"}
    if names & set(vars(model)):
        return False
    if loading and type(model).load_state_dict is not torch.nn.Module.load_state_dict:
        return False
    if not _torch_state_dict(type(model).state_dict):
        return False
    hook_lists: tuple[str, ...] = ("_state_dict_hooks", "_state_dict_pre_hooks")
    methods: tuple[str, ...] = ("_save_to_state_dict",)
    if loading:
        hook_lists += ("_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
        methods += ("_load_from_state_dict",)
    for mod in model.modules():
        # torch's state_dict() calls each child's state_dict() (with keep_vars): each must be
        # torch's own too. (load_state_dict() does not recurse through the children's.)
        if "state_dict" in vars(mod) or not _torch_state_dict(type(mod).state_dict):
            return False
        # Hooks on loading may refuse or transform; hooks on state_dict() may hand out copies
        # instead of the module's own tensors (then only load_state_dict moves the values in).
        for hooks in hook_lists:
            if getattr(mod, hooks, None):
                return False
        for method in methods:
            own = getattr(type(mod), method, None)
            if method in vars(mod) or not getattr(own, "__module__", "").startswith("torch."):
                return False
        # Extra state (get_extra_state/set_extra_state) is not the module's own tensor: a tensor
        # that get_extra_state() makes anew would be filled in place and dropped, and only
        # load_state_dict() hands it to set_extra_state(). Such a module is never stock.
        cls = type(mod)
        if (
            getattr(cls, "get_extra_state", _GET_EXTRA) is not _GET_EXTRA
            or getattr(cls, "set_extra_state", _SET_EXTRA) is not _SET_EXTRA
        ):
            return False
    return True


_GET_EXTRA = torch.nn.Module.get_extra_state
_SET_EXTRA = torch.nn.Module.set_extra_state


def _torch_state_dict(fn: Any) -> bool:
    """Whether ``fn`` is torch's own ``Module.state_dict``: compared by where its code lives, so
    that a library that replaced ``nn.Module.state_dict`` itself (a wrapper, even one made with
    ``functools.wraps``) does not pass for it."""
    code = getattr(fn, "__code__", None)
    return fn is torch.nn.Module.state_dict and code is not None and code.co_filename == _MODULE_FILE


_MODULE_FILE = torch.nn.modules.module.__file__  # not the function's: it may be replaced already


def module_state(model: Stateful) -> tuple[Any, int]:
    """``model.state_dict()`` for a save, and how many of its leaves to record as plain tensors.

    torch's ``state_dict()`` makes a ``detach()``ed alias of every parameter and buffer, and
    building (then freeing) those aliases is most of what it costs: at 50k tensors 0.17 s
    against 0.02 s for ``keep_vars=True`` (2-core VM), several times the whole copy of a 0.1 GB
    state, on the training thread. So where ``state_dict()`` is torch's own and unhooked
    (:func:`_stock_state_dict`) and every entry is a plain tensor or parameter, this takes the
    module's own tensors (same storages, same bytes) and returns their number: the snapshot
    records them as the aliases would be recorded, plain tensors without ``requires_grad``
    (:attr:`~ckptmirror.state.tree.Flattened.plain`), so the checkpoint is the same either way.
    Anything else (hooks, overrides, tensor subclasses such as DTensor, extra state that is not
    a tensor) gets the plain ``state_dict()`` and 0.
    """
    if _stock_state_dict(model):
        sd = cast(Any, model).state_dict(keep_vars=True)
        if isinstance(sd, dict) and set(map(type, sd.values())) <= _PLAIN_TENSORS:
            return sd, len(sd)
    return model.state_dict(), 0


def restore_targets(model: Stateful, stock: bool) -> Any:
    """The model's state dict to restore into: its own tensors, which restore fills in place.

    With torch's own ``state_dict`` and no hooks (``stock``, see
    :func:`~ckptmirror.state.targets.stock_loading`), ``keep_vars=True``: the parameters
    themselves instead of a ``detach()``ed alias of each, the same storages. Building and then
    freeing those aliases is most of what ``state_dict()`` costs: measured at 50k tensors on a
    2-core VM, 0.17 s against 0.02 s. (Restore then reads the parameters' attributes, which
    costs more than reading the fresh aliases': they lie far apart in memory. Measured over the
    whole restore, the parameters still come out ~0.1 s ahead at 50k tensors.)
    Restore writes their bytes through raw pointers or under ``no_grad``, so autograd never
    sees the difference. A subclass (DTensor) is not filled this way: its local shard is taken
    with ``to_local()``, which must not be a differentiable view of a parameter, so any tensor
    subclass in the state dict means the plain ``state_dict()``.
    """
    if not stock:
        return model.state_dict()
    sd = cast(Any, model).state_dict(keep_vars=True)
    kinds = set(map(type, sd.values()))
    if any(issubclass(k, torch.Tensor) and k not in _PLAIN_TENSORS for k in kinds):
        return model.state_dict()
    return sd


#: Tensor types whose ``keep_vars=True`` state dict entry restore may fill (see restore_targets).
_PLAIN_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))


def filled_in_place(loaded: Any, target: Any) -> bool:
    """Whether every entry of the loaded state dict is the target's own tensor (filled in place)."""
    if loaded is target and isinstance(target, dict):
        return True  # restore kept the target's dict as the loaded one (see restore.fill._reused)
    if not isinstance(loaded, dict) or not isinstance(target, dict):
        return False
    # In C (map over the columns): a generator over 50k entries costs 10 ms. The loaded dict is
    # rebuilt in the stored order, usually the target's: then its values are compared in order
    # and its keys as a list (a pointer or a short memcmp each), not looked up (~20 ms at 50k).
    if (
        len(loaded) == len(target)
        and all(map(operator.is_, loaded.values(), target.values()))
        and list(loaded) == list(target)
    ):
        return True
    return all(map(operator.is_, map(target.get, loaded), loaded.values()))


class IdList(list[Any]):
    """A param group's parameter ids, with a membership test by hash.

    torch's ``Optimizer.load_state_dict`` looks up, for every state tensor, the group of its
    parameter with ``param_id in group["params"]``: a scan of the list, quadratic in the
    parameters of a group (9 s for a 20k-parameter Adam). The answers are the same.
    """

    _index: frozenset[Any] | None = None

    def __contains__(self, item: object) -> bool:
        if self._index is None:
            self._index = frozenset(self)
        try:
            return item in self._index
        except TypeError:  # unhashable: the list's own scan
            return list.__contains__(self, item)


def indexed_groups(state: Any) -> Any:
    """``state`` (an optimizer's state dict) with each group's ``params`` an :class:`IdList`;
    anything else as it is (a shallow copy: the caller's dicts are not changed)."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        return state
    groups = [
        {**g, "params": IdList(g["params"])} if isinstance(g, dict) and type(g.get("params")) is list else g
        for g in state["param_groups"]
    ]
    return {**state, "param_groups": groups}
