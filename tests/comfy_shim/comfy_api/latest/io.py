"""Stand-in for ``comfy_api.latest.io``: the V3 schema classes with ComfyUI's argument names.

Only what a node pack declares is modelled: typed inputs and outputs, custom types, ``Schema``,
``ComfyNode`` and ``NodeOutput``. Constructors take the same parameter names as ComfyUI's, and
nothing else, so a misspelt option fails here as it would in ComfyUI. ``node_info`` renders a
node the way ``GET /object_info`` does, which the workflow tests compare workflows against.
"""
from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any


def _pruned(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class ControlAfterGenerate(str, Enum):
    fixed = "fixed"
    increment = "increment"
    decrement = "decrement"
    randomize = "randomize"


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------
class Input:
    io_type: str = None

    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, extra_dict=None, raw_link: bool = None, advanced: bool = None):
        if not isinstance(id, str) or not id:
            raise ValueError(f"input id must be a non-empty string, got {id!r}")
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict or {}
        self.raw_link = raw_link
        self.advanced = advanced

    def options(self) -> dict:
        return _pruned({"display_name": self.display_name, "tooltip": self.tooltip, "lazy": self.lazy,
                        "rawLink": self.raw_link, "advanced": self.advanced}) | _pruned(self.extra_dict)


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, default: Any = None, socketless: bool = None, widget_type: str = None,
                 force_input: bool = None, extra_dict=None, raw_link: bool = None, advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link, advanced)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def options(self) -> dict:
        return super().options() | _pruned({"default": self.default, "socketless": self.socketless,
                                            "widgetType": self.widget_type, "forceInput": self.force_input})


class Output:
    io_type: str = None

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id = id
        self.display_name = display_name if display_name else id
        self.tooltip = tooltip
        self.is_output_list = is_output_list


class _IntInput(WidgetInput):
    io_type = "INT"

    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, default: int = None, min: int = None, max: int = None, step: int = None,
                 control_after_generate=None, display_mode: NumberDisplay = None, socketless: bool = None,
                 force_input: bool = None, extra_dict=None, raw_link: bool = None, advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                         extra_dict, raw_link, advanced)
        self.min, self.max, self.step = min, max, step
        self.control_after_generate = control_after_generate
        self.display_mode = display_mode

    def options(self) -> dict:
        return super().options() | _pruned({
            "min": self.min, "max": self.max, "step": self.step,
            "control_after_generate": self.control_after_generate,
            "display": self.display_mode.value if self.display_mode else None})


class _FloatInput(WidgetInput):
    io_type = "FLOAT"

    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, default: float = None, min: float = None, max: float = None,
                 step: float = None, round: float = None, display_mode: NumberDisplay = None,
                 gradient_stops: list = None, socketless: bool = None, force_input: bool = None,
                 extra_dict=None, raw_link: bool = None, advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                         extra_dict, raw_link, advanced)
        self.min, self.max, self.step, self.round = min, max, step, round
        self.display_mode = display_mode
        self.gradient_stops = gradient_stops

    def options(self) -> dict:
        return super().options() | _pruned({"min": self.min, "max": self.max, "step": self.step,
                                            "round": self.round, "display": self.display_mode})


class _StringInput(WidgetInput):
    io_type = "STRING"

    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, multiline=False, placeholder: str = None, default: str = None,
                 dynamic_prompts: bool = None, socketless: bool = None, force_input: bool = None,
                 extra_dict=None, raw_link: bool = None, advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                         extra_dict, raw_link, advanced)
        self.multiline, self.placeholder, self.dynamic_prompts = multiline, placeholder, dynamic_prompts

    def options(self) -> dict:
        return super().options() | _pruned({"multiline": self.multiline, "placeholder": self.placeholder,
                                            "dynamicPrompts": self.dynamic_prompts})


class _BooleanInput(WidgetInput):
    io_type = "BOOLEAN"

    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, default: bool = None, label_on: str = None, label_off: str = None,
                 socketless: bool = None, force_input: bool = None, extra_dict=None, raw_link: bool = None,
                 advanced: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                         extra_dict, raw_link, advanced)
        self.label_on, self.label_off = label_on, label_off

    def options(self) -> dict:
        return super().options() | _pruned({"label_on": self.label_on, "label_off": self.label_off})


class _ComboInput(WidgetInput):
    io_type = "COMBO"

    def __init__(self, id: str, options=None, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, default=None, control_after_generate=None, upload=None,
                 image_folder=None, remote=None, socketless: bool = None, extra_dict=None,
                 raw_link: bool = None, advanced: bool = None):
        if isinstance(options, type) and issubclass(options, Enum):
            options = [v.value for v in options]
        if isinstance(default, Enum):
            default = default.value
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None,
                         extra_dict, raw_link, advanced)
        self.choices = list(options) if options is not None else []
        self.control_after_generate = control_after_generate

    def options(self) -> dict:
        return super().options() | _pruned({"multiselect": False, "options": self.choices,
                                            "control_after_generate": self.control_after_generate})


def _type(io_type: str, input_cls=Input, output_cls=Output) -> type:
    """A ComfyType: a class with ``io_type`` and its own ``Input``/``Output`` classes."""
    inp = type("Input", (input_cls,), {"io_type": io_type})
    out = type("Output", (output_cls,), {"io_type": io_type})
    return type(io_type.title(), (), {"io_type": io_type, "Input": inp, "Output": out})


Int = _type("INT", _IntInput)
Float = _type("FLOAT", _FloatInput)
String = _type("STRING", _StringInput)
Boolean = _type("BOOLEAN", _BooleanInput)
Combo = _type("COMBO", _ComboInput)
Image = _type("IMAGE")
Mask = _type("MASK")
Latent = _type("LATENT")
Model = _type("MODEL")
AnyType = _type("*")


def Custom(io_type: str) -> type:
    """A custom socket type, linked only to sockets of the same type string."""
    return _type(io_type)


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# ---------------------------------------------------------------------------------------------
# Schema, node, output
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    hidden: list = dataclasses.field(default_factory=list)
    description: str = ""
    search_aliases: list = dataclasses.field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_dev_only: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False
    accept_all_inputs: bool = False

    def validate(self) -> None:
        ids = [i.id for i in self.inputs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.node_id}: input ids must be unique: {ids}")
        out_ids = [o.id for o in self.outputs if o.id is not None]
        if len(set(out_ids)) != len(out_ids):
            raise ValueError(f"{self.node_id}: output ids must be unique: {out_ids}")


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand: dict = None, block_execution: str = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index):
        return self.args[index]


class ComfyNode:
    """Base of V3 nodes: classmethods only, no instance state."""

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.validate()
        return schema


def node_info(cls) -> dict:
    """The ``/object_info`` entry of a V3 node class (the fields a workflow depends on)."""
    schema = cls.GET_SCHEMA()
    inputs: dict[str, dict] = {"required": {}}
    for i in schema.inputs:
        opts = i.options()
        inputs.setdefault("optional" if i.optional else "required", {})[i.id] = [i.io_type, opts]
    return {
        "input": inputs,
        "input_order": {k: list(v) for k, v in inputs.items()},
        "output": [o.io_type for o in schema.outputs],
        "output_name": [o.display_name or o.io_type for o in schema.outputs],
        "output_is_list": [o.is_output_list for o in schema.outputs],
        "output_tooltips": [o.tooltip for o in schema.outputs],
        "name": schema.node_id,
        "display_name": schema.display_name,
        "description": schema.description,
        "category": schema.category,
        "output_node": schema.is_output_node,
        "is_input_list": schema.is_input_list,
    }
