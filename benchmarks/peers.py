"""Hand-written peers shared by the benchmarks: what a user would write without jaxdl."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state


class FlaxMLP(nn.Module):
    sizes: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for w in self.sizes[1:-1]:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.sizes[-1])(x)


def flax_state(sizes, lr: float = 1e-3, seed: int = 0):
    model = FlaxMLP(tuple(sizes))
    params = model.init(jax.random.key(seed), jnp.zeros((1, sizes[0])))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(lr))


def flax_step(state, x, y):
    def loss_fn(p):
        logits = state.apply_fn({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def flax_scan(ds, sizes, batch: int, lr: float = 1e-3):
    """A Flax + Optax epoch fused with ``lax.scan`` (shuffled copy of the data each
    epoch), as in Flax's examples. Returns ``(run_one_epoch, first_epoch_seconds)``."""
    x, y = jnp.asarray(ds.x), jnp.asarray(ds.y)
    steps = len(ds.x) // batch

    @functools.partial(jax.jit, donate_argnums=0)
    def epoch(state, key):
        perm = jax.random.permutation(key, len(x))[: steps * batch].reshape(steps, batch)
        return jax.lax.scan(lambda s, b: flax_step(s, *b), state, (x[perm], y[perm]))

    holder = {"state": flax_state(sizes, lr), "key": jax.random.key(1)}

    def run():
        holder["key"], k = jax.random.split(holder["key"])
        holder["state"], losses = epoch(holder["state"], k)
        losses.block_until_ready()

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def torch_available():
    try:
        import torch
    except ImportError:
        print("  torch: not installed; PyTorch peers skipped (pip install torch to include them)")
        return None
    return torch


def torch_mlp(torch, sizes, rates=None):
    """ReLU MLP; with ``rates`` (input, then each hidden layer), ``nn.Dropout`` layers."""
    layers = [torch.nn.Dropout(rates[0])] if rates else []
    for i, (a, b) in enumerate(zip(sizes[:-2], sizes[1:-1], strict=True)):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        layers += [torch.nn.Dropout(rates[i + 1])] if rates else []
    return torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-2], sizes[-1]))


def torch_epoch(ds, sizes, batch: int, rates=None, lr: float = 1e-3):
    """One PyTorch eager epoch (Adam, shuffled), warmed up; None where torch is absent."""
    torch = torch_available()
    if torch is None:
        return None
    torch.manual_seed(0)
    net = torch_mlp(torch, sizes, rates).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x, y = torch.from_numpy(ds.x), torch.from_numpy(ds.y.astype(np.int64))
    lossf = torch.nn.CrossEntropyLoss()

    def run():
        perm = torch.randperm(len(x))
        for i in range(len(x) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            opt.zero_grad()
            lossf(net(x[idx]), y[idx]).backward()
            opt.step()

    run()
    return run


def keras_epoch(ds, sizes, batch: int, rates=None, lr: float = 1e-3):
    """One Keras 3 ``model.fit`` epoch on the JAX backend (Adam, shuffled), warmed up; with
    ``rates``, ``Dropout`` layers; None where Keras is absent or on another backend."""
    try:
        import keras
    except ImportError:
        print("  keras: not installed (pip install -e '.[bench]'); skipped")
        return None
    if keras.backend.backend() != "jax":
        print(f"  keras: backend is {keras.backend.backend()}, not jax; skipped")
        return None
    keras.utils.set_random_seed(0)
    layers = [keras.Input((sizes[0],))] + ([keras.layers.Dropout(rates[0])] if rates else [])
    for i, w in enumerate(sizes[1:-1]):
        layers.append(keras.layers.Dense(w, activation="relu"))
        layers += [keras.layers.Dropout(rates[i + 1])] if rates else []
    model = keras.Sequential([*layers, keras.layers.Dense(sizes[-1])])
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def run():
        model.fit(ds.x, ds.y, batch_size=batch, epochs=1, shuffle=True, verbose=0)

    run()
    return run


def torch_func_ensemble(ds, sizes, batch: int, members: int, lr: float = 1e-3):
    """PyTorch's documented model ensembling: ``stack_module_state`` + ``vmap`` over a
    ``functional_call`` gradient, Adam on the stacked parameters; each member sees its
    own data order. Returns ``run_one_epoch`` or None without torch."""
    torch = torch_available()
    if torch is None:
        return None
    from torch.func import functional_call, grad, stack_module_state, vmap

    torch.manual_seed(0)
    nets = [torch_mlp(torch, sizes) for _ in range(members)]
    params, buffers = stack_module_state(nets)
    base = torch_mlp(torch, sizes).to("meta")
    lossf = torch.nn.functional.cross_entropy

    def loss(p, b, x, y):
        return lossf(functional_call(base, (p, b), (x,)), y)

    member_grad = vmap(grad(loss), in_dims=(0, 0, 0, 0))
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    x, y = torch.from_numpy(ds.x), torch.from_numpy(ds.y.astype(np.int64))
    steps = len(x) // batch

    def run():
        perms = torch.stack([torch.randperm(len(x))[: steps * batch] for _ in range(members)])
        for i in range(steps):
            idx = perms[:, i * batch : (i + 1) * batch]
            grads = member_grad(params, buffers, x[idx], y[idx])
            for name, p in params.items():
                p.grad = grads[name]
            opt.step()

    run()
    return run
