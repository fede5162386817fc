"""Training for the cascade's stages at small sizes, on a generated, captioned data set of shapes.

`shapes` makes the data set (with attribute combinations held out of training); `checker` is the independent judge
of generated images (a small classifier trained on ground-truth renders).
"""
