"""``python -m scalellm_jax.length_predictor eval|stream ...``: measure the predictor (see ``evaluation``)."""

from scalellm_jax.length_predictor.evaluation import main

raise SystemExit(main())
