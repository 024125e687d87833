"""Studies: experiments built on trained runs, run as trainers `config.trainer` can name.

`chain` runs several recipes in order, each feeding the next (the quickstart and the
pretraining comparison are chains); `transfer_study` embeds, probes, fine-tunes and
reports (its report in `transfer_report`). Importing this package registers both in
`train.TRAINERS`; `cxr_jax.main` imports it. Nothing below this layer imports it.
"""

# Importing a study module registers its trainer.
from cxr_jax.studies import chain as _chain  # noqa: F401
from cxr_jax.studies import transfer_study as _transfer_study  # noqa: F401
