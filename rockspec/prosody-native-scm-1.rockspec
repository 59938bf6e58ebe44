rockspec_format = "3.0"
package = "prosody-native"
version = "scm-1"
source = {
	url = "file://./";
}
description = {
	summary = "Native (C) modules for the Prosody XMPP server";
	detailed = [[
		mod_storage_native: archive storage (MAM, MUC logs, offline messages) on SQLite,
		with its engine in C. Loads into Prosody 0.12+; see README.md for every option.
	]];
	license = "MIT";
}
dependencies = {
	"lua >= 5.4, < 5.5";
}
external_dependencies = {
	SQLITE3 = { header = "sqlite3.h"; library = "sqlite3" };
	OPENSSL = { header = "openssl/ssl.h"; library = "ssl" };
}
build = {
	type = "builtin";
	modules = {
		-- Prosody modules: top-level names, as prosodyctl install expects.
		mod_storage_native = "modules/mod_storage_native.lua";
		mod_native_smacks = "modules/mod_native_smacks.lua";
		mod_native_dane = "modules/mod_native_dane.lua";
		mod_native_limits = "modules/mod_native_limits.lua";
		mod_native_webchat = "modules/mod_native_webchat.lua";
		-- Found by module:require("prosody_native_loader") in the installer tree.
		prosody_native_loader = "modules/prosody_native_loader.lib.lua";
		storage_native_import = "modules/storage_native_import.lib.lua";
		prosody_native_options = "modules/prosody_native_options.lib.lua";
		["prosody_native.smqueue"] = {
			sources = { "csrc/smqueue.c" };
			incdirs = { "csrc" };
			defines = { "_GNU_SOURCE" };
		};
		["prosody_native.archive"] = {
			sources = { "csrc/archive.c" };
			libraries = { "sqlite3", "pthread" };
			incdirs = { "$(SQLITE3_INCDIR)", "csrc" };
			libdirs = { "$(SQLITE3_LIBDIR)" };
			defines = { "_GNU_SOURCE" };
		};
		["prosody_native.dane"] = {
			sources = { "csrc/dane.c" };
			libraries = { "ssl", "crypto" };
			incdirs = { "$(OPENSSL_INCDIR)", "csrc" };
			libdirs = { "$(OPENSSL_LIBDIR)" };
			defines = { "_GNU_SOURCE" };
		};
		["prosody_native.limiter"] = {
			sources = { "csrc/limiter.c" };
			incdirs = { "csrc" };
			defines = { "_GNU_SOURCE" };
		};
	};
}
