from xprune_jax.cli import run

run()
