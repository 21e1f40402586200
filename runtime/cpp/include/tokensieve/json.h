// A minimal JSON reader (RFC 8259) for the engine metadata, plus string escaping for the report writer.
// Dependency-free on purpose: the runtime must build in CI from a bare compiler + CUDA headers.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tokensieve::json {

// Raised by parse(); what() names the line and column.
class ParseError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class Value {
public:
    enum class Type { Null, Bool, Number, String, Array, Object };

    Value() = default;
    static Value boolean(bool b);
    static Value number(double d);
    static Value string(std::string s);
    static Value array(std::vector<Value> items);
    static Value object(std::map<std::string, Value> members);

    Type type() const { return type_; }
    bool is_null() const { return type_ == Type::Null; }
    bool is_bool() const { return type_ == Type::Bool; }
    bool is_number() const { return type_ == Type::Number; }
    bool is_string() const { return type_ == Type::String; }
    bool is_array() const { return type_ == Type::Array; }
    bool is_object() const { return type_ == Type::Object; }
    // True for a number with no fractional part that fits in int64 (sizes, shape dims).
    bool is_integer() const;

    bool as_bool() const;                            // std::runtime_error on a type mismatch
    double as_double() const;
    int64_t as_int() const;
    const std::string& as_string() const;
    const std::vector<Value>& as_array() const;
    const std::map<std::string, Value>& as_object() const;

    // Object lookup: nullptr when this is not an object or the key is absent.
    const Value* find(const std::string& key) const;

private:
    Type type_ = Type::Null;
    bool b_ = false;
    double d_ = 0.0;
    std::string s_;
    std::shared_ptr<std::vector<Value>> a_;
    std::shared_ptr<std::map<std::string, Value>> o_;
};

// Parse one JSON document (trailing whitespace allowed, nothing else). Throws ParseError.
Value parse(const std::string& text);

// "a\"b" -> "\"a\\\"b\"" (quoted, escaped) for writing JSON.
std::string quote(const std::string& s);

const char* type_name(Value::Type t);

}  // namespace tokensieve::json
