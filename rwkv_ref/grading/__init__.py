"""The grader's parts: ``exercises`` (the adapter table: per exercise its inputs, call,
reference and comparison), ``draw`` (hypothesis strategies and compact printing) and
``check`` (one exercise checked with hypothesis). The command is ``python -m rwkv_ref.grade``.
"""
