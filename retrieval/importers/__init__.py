"""Importing embeddings that were computed elsewhere into style databases, without the images.

``engine`` streams parts (one part in memory at a time) into a database, resumably; the readers describe the
parts of a format: ``compvis`` (CompVis retrieval databases, ``*.npz`` with ``embedding``, ``img_id``,
``patch_coords``) and ``clip_retrieval`` (clip-retrieval / img2dataset ``img_emb/*.npy`` + ``metadata/*.parquet``)."""
