//! One list per counter enum: [`counter_enum!`] makes the variants, their stable names, their
//! count, the list of all of them and their help text from it, so a counter is added in one
//! place (and its index, which is a map index the kernel and the agent share, follows its
//! position in the list).

/// Defines a counter enum from one list of `Variant = "stable_name"` entries, each with its
/// doc comment: a `#[repr(u32)]` enum numbered from 0 in list order (the order is ABI: append,
/// never reorder), and `COUNT` (the number of variants, the length of the map it indexes),
/// `ALL` (every variant in index order), `name()` (the snake_case name of CLI output and
/// metrics labels) and `help()` (the doc comment as one line, for metrics help and docs).
macro_rules! counter_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $enum:ident {
            $(
                $(#[doc = $doc:literal])+
                $variant:ident = $name:literal,
            )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $enum {
            $(
                $(#[doc = $doc])+
                $variant,
            )+
        }

        impl $enum {
            /// Number of variants: the length of the map this enum indexes.
            pub const COUNT: u32 = [$($enum::$variant),+].len() as u32;
            /// All variants in index order.
            pub const ALL: [$enum; $enum::COUNT as usize] = [$($enum::$variant),+];

            /// Stable snake_case name used in CLI output and metrics labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $($enum::$variant => $name,)+
                }
            }

            /// What the counter means: its doc comment, lines joined.
            pub const fn help(self) -> &'static str {
                match self {
                    $($enum::$variant => concat!($($doc),+).trim_ascii_start(),)+
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    counter_enum! {
        /// A test enum.
        enum Probe {
            /// First, with a
            /// second line.
            First = "first",
            /// Second.
            Second = "second",
        }
    }

    #[test]
    fn one_list_makes_the_numbering_names_count_and_help() {
        assert_eq!(Probe::COUNT, 2);
        assert_eq!(Probe::ALL, [Probe::First, Probe::Second]);
        assert_eq!(Probe::Second as u32, 1);
        assert_eq!(Probe::First.name(), "first");
        assert_eq!(Probe::First.help(), "First, with a second line.");
        assert_eq!(Probe::Second.help(), "Second.");
    }
}
