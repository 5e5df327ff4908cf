mod push;
mod support;
