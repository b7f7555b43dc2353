"""Entry point of the hyperparameter search: `python tune/run.py --space FILE [options]`.

    python tune/run.py --space search_spaces/demo.yaml            # a new study
    python tune/run.py --space search_spaces/demo.yaml --resume   # continue it after a crash
    python tune/run.py --space xd --dry-run data.feature_root=/data/xd data.list_dir=/data/xd/list

Options: --resume, --address auto|ray://HOST:PORT, --num-samples N, --storage-path DIR,
--final-seeds N, --dry-run, then config overrides section.field=value. Everything lives in the
installed `tune` package, so `ray submit` (which uploads only this file) works on a cluster
where it is installed.
"""

from tune.driver import main

raise SystemExit(main())
