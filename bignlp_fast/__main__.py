from bignlp_fast.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports this as its parent's main module
    raise SystemExit(main())
