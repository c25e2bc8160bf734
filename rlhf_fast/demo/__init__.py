"""The embedded demo (`rlhf-fast demo`): a synthetic language with a hidden gold preference.

    task.py    the language, the demonstrations, the hidden gold score and the noisy labeler
    run.py     the stages through the product's trainers, and the command's entry point
    report.py  plots and report.md
"""
